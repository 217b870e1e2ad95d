"""The Advisor and Law-vs-reality views, computed from the library: no Gradio here.

The advisor's sensitivity table is the slow part (a range search per width, then two network
passes per layer): it is measured once per model and per what it depends on in the recipe, on a
few of the distilled images, and kept in the cache's bounded store of slow results. Every advice
after that (another budget, Fill) is a dynamic programme of milliseconds.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

from spiq.analysis.advise import Advice, advise, check_budget
from spiq.analysis.law import law_vs_reality
from spiq.analysis.sensitivity import LayerSensitivity, predicted_sqnr_db, sensitivity
from spiq.config import ConfigError, LayerOverride, QuantConfig
from spiq.methods.registry import get_method
from spiq.models.vit import is_transformer
from spiq.quantize.distill import has_batchnorm
from spiq.ui import plots
from spiq.ui.cache import ModelCache, config_key
from spiq.ui.views import Scene, default_range_layer

ADVISOR_WIDTHS = (4, 5, 6, 8)
# Of the 8 distilled images that ship with the default model: half of them halves the probes
# (~10-20 s on Lite0 on two cores instead of 20-40 s) and ranks the same most sensitive layers.
ADVISOR_IMAGES = 4
DEFAULT_BUDGET = 4.5


def advisor_config(config: QuantConfig) -> QuantConfig:
    """What the sensitivity table depends on in `config`: not the input widths the advisor chooses
    (model-wide or per layer), nor the bias fit and int8 graph every probe switches off. A recipe
    filled from an advice finds the table its advice came from."""
    return config.replace(input_bits=QuantConfig().input_bits, overrides=_without_input_bits(config),
                          bias_images=0, int8_graph=False)


def _without_input_bits(config: QuantConfig) -> dict[str, LayerOverride]:
    kept = {n: replace(o, input_bits=None) for n, o in config.overrides.items()}
    return {n: o for n, o in kept.items() if o != LayerOverride()}


def unavailable(cache: ModelCache, name: str, config: QuantConfig) -> str | None:
    """Why the advisor cannot measure `name` under `config`, or None."""
    model = cache.load(name).model
    if is_transformer(model) or not has_batchnorm(model):
        return (f"The advisor measures on images distilled from BatchNorm statistics; {name} has no BatchNorm. "
                "Pick a CNN such as efficientnet_lite0.")
    for m in config.methods_named():
        if get_method(m).needs_calibration:
            return (f"The advisor is data-free: method {m} reads calibration images. Pick spiq, static-tensor "
                    "or a dynamic method.")
    return None


def table_key(name: str, config: QuantConfig) -> tuple:
    return "sensitivity", name, config_key(advisor_config(config)), ADVISOR_WIDTHS, ADVISOR_IMAGES


def has_table(cache: ModelCache, name: str, config: QuantConfig) -> bool:
    """Whether the advisor has measured this model and recipe (never measures)."""
    return cache.cached_slow(table_key(name, config))[0]


def sensitivity_table(cache: ModelCache, name: str, config: QuantConfig, progress=None) -> list[LayerSensitivity]:
    """The advisor's table for `name` under `config`, measured once (tens of seconds) and kept."""
    if (why := unavailable(cache, name, config)) is not None:
        raise ConfigError(why)
    base = advisor_config(config)

    def measure():
        loaded = cache.load(name)
        # the distilled images, made without the lock where they neither ship nor are cached
        cache.distill(name, base.replace(bias_images=8), progress)
        memo = cache.memo(name)
        with cache.lock:
            images = memo.distilled_images(8)[:ADVISOR_IMAGES]
        return sensitivity(loaded.model, base, ADVISOR_WIDTHS, images=images, memo=memo, progress=progress,
                           lock=cache.lock)
    return cache.slow(table_key(name, config), measure)


def advice_for(table: list[LayerSensitivity], config: QuantConfig, budget: float) -> Advice:
    """The advice at `budget` as a recipe on top of `config`: its per-layer input widths replaced,
    the model-wide width the one most layers get (the fewest overrides), the rest kept."""
    widths = list(ADVISOR_WIDTHS)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"the budget must be a number of bits, got {budget!r}")
    check_budget(budget, widths)
    base = config.replace(overrides=_without_input_bits(config))
    first = advise(table, base, budget, widths)
    common = Counter(first.input_bits.values()).most_common(1)[0][0]
    int8 = base.int8_graph and all(b == 8 for b in first.input_bits.values())
    return advise(table, base.replace(input_bits=common, int8_graph=int8), budget, widths)


def raised(advice: Advice, budget: float) -> dict[str, int]:
    """The layers the advice gives more input bits than a uniform recipe within the budget would."""
    return {n: b for n, b in advice.input_bits.items() if b > math.floor(budget)}


ADVISOR_HEADERS = ["layer", "input values %", "logit SQNR dB, input alone at 4 bits",
                   "logit SQNR dB, weights alone at 4 bits", "suggested input bits"]


def advisor(cache: ModelCache, name: str, config: QuantConfig, budget: float, progress=None):
    """(summary markdown, ranking figure, table rows) of the advice at `budget` for the recipe."""
    if (why := unavailable(cache, name, config)) is not None:
        return why, None, []
    table = sensitivity_table(cache, name, config, progress)
    adv = advice_for(table, config, budget)
    low, floor = ADVISOR_WIDTHS[0], math.floor(budget)
    rows = [[r.name, round(100 * r.input_share, 3), round(r.input_sqnr[low], 2), round(r.weight_sqnr[low], 2),
             adv.input_bits[r.name]] for r in table]
    up = raised(adv, budget)
    text = (f"**Budget {budget:g} bits**: average input width {adv.input_budget_used:.3f}, predicted logit SQNR "
            f"**{adv.predicted_sqnr_db:.1f} dB** on {ADVISOR_IMAGES} distilled images")
    if floor in ADVISOR_WIDTHS:
        uniform = predicted_sqnr_db(sum(r.noise("input", floor) + r.noise("weight", config.weight_bits) for r in table))
        text += f" (uniform {floor} bits: {uniform:.1f} dB)"
    text += (f". {len(up)} of {len(table)} layers get more than {floor} bits. **Fill table and apply** puts these "
             f"widths into the per-layer table (model-wide input bits {adv.config.input_bits}) and applies them.")
    return text, plots.sensitivity_ranking(table, adv.input_bits, low, budget), rows


def layers_raised(cache: ModelCache, name: str, config: QuantConfig, budget: float) -> dict[str, int] | None:
    """What the layer-error view marks: the layers the advice at `budget` raises, if the advisor
    has measured this model and recipe (None: it has not, nothing is measured here)."""
    found, table = cache.cached_slow(table_key(name, config))
    if not found:
        return None
    return raised(advice_for(table, config, budget), budget)


# --- law versus reality -------------------------------------------------------------------------

def law_layers(sc: Scene) -> list[str]:
    """Layers with a predicted law to compare (not the image's input, whose range is its bounds)."""
    prop = sc.qmodel.report.propagation
    return [n for n in sc.range_layers if not prop.inputs[n].use_bounds]


def default_law_layer(cache: ModelCache, sc: Scene) -> str | None:
    """The Channel ranges view's layer (channels' ranges differ most) where it has a law."""
    layers = law_layers(sc)
    layer = default_range_layer(cache, sc)
    return layer if layer in layers else (layers[0] if layers else None)


def law(cache: ModelCache, sc: Scene, layer: str, channel: int | None = None):
    """(channel shown, histogram with the law, spread scatter, summary) of one layer's input on the image."""
    with cache.lock:
        lv = law_vs_reality(sc.qmodel, sc.x[None], layer, channel, cache.memo(sc.name))
    hist, scatter = plots.law_vs_reality(lv)
    c = lv.channel
    text = (f"Channel {c} of {lv.law.channels}: the law says mean {float(lv.predicted_mean[c]):.3g}, std "
            f"{float(lv.predicted_std[c]):.3g}; this image gives mean {float(lv.observed_mean[c]):.3g}, std "
            f"{float(lv.observed_std[c]):.3g}. SPIQ's range clips values of "
            f"{int((lv.clipped_spiq_all > 0).sum())} of the {lv.law.channels} channels on this image"
            + ("." if channel is not None else " (shown: the most clipped channel)." if lv.clipped_spiq > 0
               else " (shown: the channel with the widest range)."))
    return c, hist, scatter, text
