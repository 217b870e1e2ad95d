"""What each view of the explorer shows, computed from the library: no Gradio here.

Every function takes the shared `ModelCache` and one user's request (model, config, image) and
returns plotly figures and plain rows, so the app only lays them out and a notebook can call the
same functions. Every model run holds the cache's lock (see `spiq.ui.cache`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from spiq.core.errors import AnalysisError, UnknownNameError
from spiq.analysis import layers as analysis

from spiq.ui import plots
from spiq.analysis.attribution import attribution_drift
from spiq.models.data import allowed_file
from spiq.models.registry import LoadedModel
from spiq.ui.cache import ModelCache, config_key
from spiq.config import GRANULARITIES, MAX_BITS, METHODS, MIN_BITS, ConfigError, QuantConfig, read_recipe_text
from spiq.core.quant import QuantLayer
from spiq.ui.scratch import ScratchDir
from spiq.methods.registry import get_method
from spiq.quantize.api import methods_for
from spiq.quantize.memo import quantizable_layers
from spiq.quantize.report import QuantResult
from spiq.models.vit import is_transformer  # noqa: F401  (the app asks views whether a model has attention)
from spiq.core.metrics import tensor_sqnr_db


@dataclass
class Scene:
    """One user's request made concrete: the shared models and the image as the model sees it."""
    name: str                    # the model's name in the registry
    loaded: LoadedModel
    config: QuantConfig
    qmodel: QuantResult
    x: torch.Tensor              # (3, H, W) preprocessed
    picture: np.ndarray          # (H, W, 3) uint8: the crop the model sees

    @property
    def layers(self) -> list[str]:
        return [n for n, m in self.qmodel.model.named_modules() if isinstance(m, QuantLayer)]

    @property
    def map_layers(self) -> list[str]:
        """Layers the error map can show: convs, or a transformer's token layers."""
        return analysis.spatial_layers(self.qmodel.model)

    @property
    def range_layers(self) -> list[str]:
        """Layers whose input has a data-free law: those the channel-range view can explain."""
        prop = self.qmodel.report.propagation
        return [n for n in self.layers if prop is not None and n in prop.inputs]


def image_digest(image: Image.Image) -> str:
    """Names the pixels, so the same photo sent again (another session, an example) finds its views."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def scene(cache: ModelCache, name: str, config: QuantConfig, image: Image.Image, progress=None) -> Scene:
    loaded = cache.load(name)
    qmodel = cache.quantized(name, config, progress)
    x = loaded.preprocess(image)
    return Scene(name, loaded, config, qmodel, x, loaded.preprocess.to_image(x))


def _describe(cmp: analysis.Comparison) -> str:
    f, q = cmp.float, cmp.quant
    verdict = "**top-1 flipped**" if cmp.flipped else "top-1 kept"
    return (f"Float: **{f.classes[0]}** ({f.probs[0]:.0%}) · quantized: **{q.classes[0]}** ({q.probs[0]:.0%}) — "
            f"{verdict}; logit SQNR {cmp.logit_sqnr:.1f} dB")


def predictions(cache: ModelCache, sc: Scene):
    """Top-5 of both models side by side, and one line that says what happened."""
    with cache.lock:
        cmp = analysis.compare_predictions(sc.loaded.model, sc.qmodel, sc.x, sc.loaded.classes)
    return plots.predictions(cmp), _describe(cmp)


RANGES_CAPTION = ("Look for bars far shorter than the shaded per-tensor band: on one shared grid those "
                  "channels use few of its steps; on their own range they use all of them.")


def channel_ranges(cache: ModelCache, sc: Scene, layer: str):
    with cache.lock:
        cr = analysis.channel_ranges(sc.loaded.model, sc.qmodel, layer, sc.x[None], cache.memo(sc.name))
    return plots.channel_ranges(cr, caption=RANGES_CAPTION)


def default_range_layer(cache: ModelCache, sc: Scene) -> str | None:
    """The layer whose channels' data-free ranges differ most (at 8 bits, whatever the recipe's):
    where per-channel input ranges show their point. Computed from the model, once per recipe."""
    spread = cache.derived(sc.name, sc.config, "channel_spread", lambda: analysis.channel_spread(sc.qmodel, 8, cache.memo(sc.name)))
    shown = {n: v for n, v in spread.items() if n in sc.range_layers}
    return max(shown, key=shown.get) if shown else None


def layer_error(cache: ModelCache, sc: Scene, raised: dict[str, int] | None = None, budget: float | None = None):
    """Per-layer SQNR (isolated and propagated), the split by error source, and the fold cost;
    `raised`: the layers the advisor raises at `budget`, marked."""
    with cache.lock:
        breakdown = analysis.layer_breakdown(sc.loaded.model, sc.qmodel, sc.x[None])
        rows = analysis.layer_sqnr(sc.loaded.model, sc.qmodel, sc.x[None], breakdown=breakdown)
        folds = cache.derived(sc.name, sc.config, "fold_cost",
                              lambda: analysis.fold_cost(sc.loaded.model, sc.qmodel, cache.memo(sc.name)))
    table = [[r.name, round(r.isolated, 2), round(r.propagated, 2), round(b.clip, 2), round(b.input, 2),
              round(b.weight, 2), round(100 * b.clipped, 3)] for r, b in zip(rows, breakdown)]
    return (plots.layer_sqnr(rows, raised=raised, budget=budget), plots.layer_breakdown(breakdown),
            plots.fold_cost(folds) if folds else None, table)


LAYER_ERROR_HEADERS = ["layer", "isolated dB", "propagated dB", "clip-only dB", "input-only dB", "weight-only dB",
                       "clipped %"]


def error_map(cache: ModelCache, sc: Scene, layer: str, channel: int | None = None):
    """|y − ŷ| of one conv (or token) layer, or of the "logits", over the image the model sees."""
    if layer != "logits" and layer not in sc.map_layers:
        raise UnknownNameError(f"{layer!r} is not a layer with a spatial output; the error map shows "
                               f"logits or {', '.join(sc.map_layers[:3])}…")
    target = [layer] if layer != "logits" else sc.map_layers[-1:]
    if channel is not None:
        out = sc.qmodel.model.get_submodule(target[0]).layer
        c = out.out_channels if isinstance(out, nn.Conv2d) else out.out_features
        if not 0 <= channel < c:
            raise AnalysisError(f"{target[0]} has channels 0 to {c - 1}; got {channel}")
    with cache.lock:
        maps = analysis.error_maps(sc.loaded.model, sc.qmodel, sc.x, target, channel)
    if layer == "logits" and "logits" not in maps:   # a transformer's head reads the class token only
        layer = target[0]
    m = maps["logits" if layer == "logits" else layer]
    title = ("error of the float top-1 class's evidence (last feature map × classifier row)" if layer == "logits"
             else f"{layer}: |y − ŷ|, " + (f"channel {channel}" if channel is not None else "mean over channels"))
    return plots.error_map(sc.picture, m, title)


def attribution(cache: ModelCache, sc: Scene, method: str = "grad-cam"):
    with cache.lock:
        drift = attribution_drift(sc.loaded.model, sc.qmodel, sc.x, method)
    return plots.attribution(sc.picture, drift)


def attention(cache: ModelCache, sc: Scene, block: int = -1):
    """Per-head attention maps of one block, float vs quantized, and the rank inversions of every block."""
    with cache.lock:
        am = analysis.attention_maps(sc.loaded.model, sc.qmodel, sc.x, block)
    worst = max(range(len(am.inversions)), key=lambda i: am.inversions[i][0] / max(am.inversions[i][1], 1))
    r, n = am.inversions[am.block]
    text = (f"Block {am.block}: the quantized scores reverse **{r:,}** of {n:,} compared key pairs "
            f"({100 * r / max(n, 1):.2f} %); most in block {worst}.")
    return plots.attention(sc.picture, am), plots.rank_inversions(am), text


def method_config(config: QuantConfig, method: str) -> QuantConfig:
    """`config` with another method, the method's own input granularity, and no per-layer overrides
    (and the int8 graph's simulation only for the static methods that have one)."""
    return config.replace(method=method, input_granularity=None, overrides={},
                          int8_graph=config.int8_graph and get_method(method).int8_graph)


@torch.no_grad()
def methods(cache: ModelCache, name: str, config: QuantConfig, image: Image.Image, progress=None):
    """Every method at the chosen bits on this image: does top-1 agree, and how close are the logits."""
    loaded = cache.load(name)
    x = loaded.preprocess(image)[None]
    rows = []
    with cache.lock:
        yf = loaded.model(x)[0]
    applicable = methods_for(loaded.model)
    for i, m in enumerate(applicable):
        if progress is not None:
            progress(i / len(applicable), f"quantizing with {m}")
        # the lock one method at a time: other visitors' predictions run between them
        q = cache.quantized(name, method_config(config, m))
        with cache.lock:
            yq = q(x)[0]
        p = yq.softmax(0)
        rows.append(dict(
            method=m, top1=loaded.classes[int(yq.argmax())], prob=float(p.max()),
            agrees=bool(yq.argmax() == yf.argmax()),
            logit_sqnr=tensor_sqnr_db(yf, yq),
            calibrated_on=(f"{len(cache.calibration(name))} example images" if get_method(m).needs_calibration else "")))
    return plots.methods(rows, loaded.classes[int(yf.argmax())], config), rows


METHODS_HEADERS = ["method", "top-1", "probability", "agrees with float", "logit SQNR dB", "calibration"]


def methods_table(rows) -> list[list]:
    return [[r["method"], r["top1"], round(r["prob"], 3), "yes" if r["agrees"] else "NO", round(r["logit_sqnr"], 2),
             r["calibrated_on"]] for r in rows]


@torch.no_grad()
def story(cache: ModelCache, name: str, config: QuantConfig, image: Image.Image):
    """Float vs SPIQ vs per-tensor static on one screen: top-5 and where the logit error comes from."""
    loaded = cache.load(name)
    x = loaded.preprocess(image)
    picture = loaded.preprocess.to_image(x)
    panels = []
    for m in ("spiq", "static-tensor"):
        q = cache.quantized(name, method_config(config, m))
        with cache.lock:   # one method at a time: other visitors' predictions run between them
            cmp = analysis.compare_predictions(loaded.model, q, x, loaded.classes)
            last = analysis.spatial_layers(q.model)[-1:]
            maps = analysis.error_maps(loaded.model, q, x, last)
            panels.append((m, cmp, maps.get("logits", maps[last[0]])))
    return plots.story(picture, panels, config)


# --- the per-layer table ------------------------------------------------------------------------

LAYER_TABLE_HEADERS = ["layer", "kind", "in channels", "method", "weight bits", "input bits", "input granularity",
                       "skip"]


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise conv"
    return f"conv {m.kernel_size[0]}x{m.kernel_size[1]}"


def layer_rows(model: nn.Module, config: QuantConfig) -> list[list]:
    """What every quantizable layer gets under `config`: the editable per-layer table."""
    rows = []
    for name in quantizable_layers(model):
        m = model.get_submodule(name)
        s = config.for_layer(name)
        rows.append([name, _kind(m), m.in_channels if isinstance(m, nn.Conv2d) else m.in_features, s.method,
                     s.weight_bits, s.input_bits, "channel" if s.input_per_channel else "tensor", s.skip])
    return rows


def _cell_bits(layer: str, field: str, value) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"layer {layer}: {field} must be an integer from 2 to 16, got {value!r}") from None
    if not f.is_integer():
        raise ConfigError(f"layer {layer}: {field} must be an integer from 2 to 16, got {value!r}")
    return int(f)


def _cell_bool(layer: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"layer {layer}: skip must be true or false, got {value!r}")


def recipe_digest(config: QuantConfig) -> str:
    return hashlib.sha1(config_key(config).encode()).hexdigest()[:16]


def read_recipe(path: str, roots) -> QuantConfig:
    """A recipe file a user uploaded: inside `roots`, a small UTF-8 JSON file."""
    if (real := allowed_file(path, roots)) is None:
        raise ConfigError("this recipe file is not one that was uploaded here")
    return QuantConfig.from_json(read_recipe_text(real, "the recipe"))


CONTROL_GRANULARITIES = ("method default", *GRANULARITIES)


def control_bits(label: str, value) -> int:
    """A slider's value as whole bits, naming the control: the API lets anyone send 8.5, NaN or "8"."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    # range first: a huge integer has no float to test for wholeness
    if not ok or not MIN_BITS <= value <= MAX_BITS or not float(value).is_integer():
        raise ConfigError(f"{label} must be a whole number from {MIN_BITS} to {MAX_BITS}, got {value!r}")
    return int(value)


def _control_choice(label: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{label} must be one of {', '.join(options)}; got {value!r}")
    return value


def control_values(config: QuantConfig) -> tuple:
    """What the app's controls show for `config`: (method, weight bits, input bits, weight and input
    granularity, bias fit), the values `config_from_controls` reads back."""
    return (config.method, config.weight_bits, config.input_bits, config.weight_granularity,
            config.input_granularity or "method default", config.bias_images != 0)


def config_from_controls(applied: QuantConfig, method, wbits, abits, wgran, igran, bias_fit, rows) -> QuantConfig:
    """The recipe the app's controls describe, on top of the one last applied.

    Every value is checked as the control that sends it, since the API accepts any JSON: a refusal
    names the control and leaves the session's recipe as it was."""
    method = _control_choice("Method", method, tuple(METHODS))
    wbits, abits = control_bits("Weight bits", wbits), control_bits("Input bits", abits)
    wgran = _control_choice("Weight granularity", wgran, GRANULARITIES)
    igran = _control_choice("Input granularity", igran, CONTROL_GRANULARITIES)
    if not isinstance(bias_fit, (bool, np.bool_)):
        raise ConfigError(f"Bias fit must be true or false, got {bias_fit!r}")
    if rows is not None and not isinstance(rows, list):
        raise ConfigError(f"the per-layer table must be a list of rows, got {type(rows).__name__}")
    # Table rows show what the applied config gave each layer: rows that differ are the user's edits.
    edits = config_from_rows(applied, rows).overrides if rows else applied.overrides
    # Settings without a control (an uploaded recipe's clipping, tails, equalization...) stay as
    # they were; mixed precision only while the method owns it (liu-ptq). The box switches the
    # bias fit off, or back on with the recipe's own image count (or automatic).
    return applied.replace(method=method, weight_bits=wbits, input_bits=abits, weight_granularity=wgran,
                           input_granularity=None if igran == "method default" else igran,
                           bias_images=(applied.bias_images or None) if bias_fit else 0, overrides=dict(edits),
                           mixed_precision=applied.mixed_precision if "mixed_precision" in get_method(method).options
                           else None)


def config_from_rows(config: QuantConfig, rows) -> QuantConfig:
    """`config` with per-layer overrides wherever a table row differs from the model-wide settings."""
    base = config.replace(overrides={})
    overrides = {}
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not all(isinstance(c, (str, int, float, bool, type(None), np.generic))
                                                      for c in row):
            raise ConfigError(f"the per-layer table's row {i + 1} must be a list of texts, numbers and booleans")
        if not isinstance(row[0] if row else None, str):
            raise ConfigError(f"the per-layer table's row {i + 1} must start with a layer name")
        if len(row) != len(LAYER_TABLE_HEADERS):
            raise ConfigError(f"the layer table needs {len(LAYER_TABLE_HEADERS)} columns "
                              f"({', '.join(LAYER_TABLE_HEADERS)}), got a row of {len(row)}")
        name, _, _, method, wbits, ibits, gran, skip = row
        d = base.for_layer(name)
        ov = {}
        if method != d.method:
            if not isinstance(method, str) or method not in METHODS:
                raise ConfigError(f"layer {name}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
            ov["method"] = method
        if (w := _cell_bits(name, "weight bits", wbits)) != d.weight_bits:
            ov["weight_bits"] = w
        if (b := _cell_bits(name, "input bits", ibits)) != d.input_bits:
            ov["input_bits"] = b
        own = QuantConfig(method=method).for_layer(name).input_per_channel if "method" in ov else d.input_per_channel
        if gran not in GRANULARITIES:
            raise ConfigError(f"layer {name}: input granularity must be channel or tensor, got {gran!r}")
        if (gran == "channel") != own:
            ov["input_granularity"] = gran
        if _cell_bool(name, skip):
            ov["skip"] = True
        if (kept := config.overrides.get(name)) is not None and kept.weight_granularity is not None:
            ov["weight_granularity"] = kept.weight_granularity   # no column for it: kept from the recipe
        if ov:
            overrides[name] = ov
    return base.replace(overrides=overrides)


# --- deploy: the recipe as a real int8 model -------------------------------------------------------

def _kept(cache: ModelCache, name: str, config: QuantConfig, what: str, exports: ScratchDir, key: str, make):
    """`make(folder)` once per (model, config) while its files last: the scratch folder deletes the
    least recently used entries, and a result whose files went is made again."""
    folder = exports.entry(key)
    result = cache.derived(name, config, what, lambda: make(folder), locked=False)
    if not all(Path(p).exists() for p in _paths(result)):
        result = cache.derived(name, config, what, lambda: make(exports.entry(key)), fresh=True, locked=False)
    return result


def _paths(result) -> list[str]:
    return list(result.values()) if isinstance(result, dict) else [result.path]


def _baselines(cache: ModelCache, name: str, exports: ScratchDir) -> dict[str, str]:
    """ONNX files of the float model and of ONNX Runtime's own static and dynamic int8 (once per model)."""
    from spiq import export
    from spiq.export import runtime

    def make(folder):
        with cache.lock:   # the export runs the shared float model
            fp = export.export_onnx(cache.load(name).model, folder / f"{name}_fp32.onnx", quantized=False, batch=1).path
        return {"ORT FP32": fp,
                "ORT static int8": runtime.ort_static_int8(fp, folder / f"{name}_ort_static.onnx", cache.calibration(name)),
                "ORT dynamic int8": runtime.ort_dynamic_int8(fp, folder / f"{name}_ort_dynamic.onnx")}
    return _kept(cache, name, QuantConfig(), "onnx_baselines", exports, f"{name}-baselines", make)


@torch.no_grad()
def deploy(cache: ModelCache, name: str, config: QuantConfig, image: Image.Image, exports: ScratchDir, progress=None):
    """Export the recipe to ONNX int8, run it on this image, time it against FP32 / static / dynamic int8.

    Files go to `exports`, one entry per recipe, reused. Returns (latency figure, parity figure,
    markdown, path of the .onnx)."""
    from spiq import export
    from spiq.export import runtime

    def step(fraction, text):
        if progress is not None:
            progress(fraction, text)

    export.check_exportable(config)   # before any work
    loaded = cache.load(name)
    x = loaded.preprocess(image)[None]
    # The shared models run under the lock; ONNX Runtime's quantizers and timings do not hold it, so
    # other visitors' predictions go on meanwhile (and share the CPU with the timings).
    qmodel = cache.quantized(name, config)
    step(0.05, "exporting the recipe to ONNX")
    tag = f"{name}_{config.method}_W{config.weight_bits}A{config.input_bits}_{recipe_digest(config)[:8]}"

    def export_recipe(folder):
        with cache.lock:
            return export.export_onnx(qmodel, folder / f"{tag}.onnx", batch=1)
    report = _kept(cache, name, config, "onnx", exports, tag, export_recipe)
    step(0.2, "ONNX Runtime baselines (float export, quantize_static, quantize_dynamic)")
    paths = {**_baselines(cache, name, exports), "SPIQ int8" if config.method == "spiq" else
             f"{config.method} int8 (spiq export)": report.path}
    rows = []
    for i, (variant, path) in enumerate(paths.items()):
        step(0.4 + 0.1 * i, f"timing {variant}")
        lat = runtime.session_latency(path, 1, tuple(x.shape[1:]), images=x)
        rows.append({"variant": variant, "ms": lat.median_ms, "p10": lat.p10_ms, "p90": lat.p90_ms})
    step(0.85, "int8 vs simulation, layer by layer")
    real = runtime.run_onnx(runtime.ort_session(report.path), x)[0]
    with cache.lock:
        sim = qmodel(x)[0]
        layers = export.layer_sqnr(qmodel, report, x)
        float_top = int(loaded.model(x)[0].argmax())
    cpu = runtime.cpu_int8_features()
    fp = next(r["ms"] for r in rows if r["variant"] == "ORT FP32")
    static = next(r["ms"] for r in rows if r["variant"] == "ORT static int8")
    mine = rows[-1]["ms"]
    classes = loaded.classes
    logit_sqnr = tensor_sqnr_db(sim, real)
    text = (f"**{rows[-1]['variant']}**: {mine:.2f} ms per image = {mine / static:.2f}× ORT static int8, "
            f"{mine / fp:.2f}× ORT FP32 (CPU: {cpu}).  \n"
            f"Top-1 on this image: real int8 **{classes[int(real.argmax())]}**, simulation "
            f"**{classes[int(sim.argmax())]}**, float **{classes[float_top]}**; "
            f"logits SQNR real vs simulation {logit_sqnr:.1f} dB.  \n"
            f"{report.summary()}")
    return plots.deploy_latency(rows, cpu), plots.deploy_parity(layers), text, report.path
