"""`quantize(model, config)`: a quantized copy of a float model; the original is never touched."""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from spiq.quantize import liu
from spiq.config import (AUTO_BIAS_IMAGES, CALIBRATED, DATA_FREE, METHODS, NEEDS_CALIBRATION, TRANSFORMER_ONLY, ConfigError,
                     QuantConfig)
from spiq.transforms.fold import EqualizedPair, equalize, fold_batchnorm
from spiq.quantize.distill import distilled_images, find_distilled, has_batchnorm
from spiq.graph.trace import QUANTIZABLE, ModelGraph, analyse, is_passthrough
from spiq.core.hooks import run_with_hooks
from spiq.core.quant import InputQuant, QuantLayer, channel_axis, input_scale_zero, make_weights
from spiq.core.tensors import Range, broadcast_input, per_input_channel
from spiq.ranges.laws import (ACTIVATIONS, Dist, Propagation, RangeEffect, calibrated_range, clip_range, law_moments,
                              observe, propagate, range_effect, sigma_range, sorted_samples, unknown_input_dist)
from spiq.models.vit import VitGraph, matmul_sites, tap_attention, vit_graph
from spiq.ranges.vit import vit_laws

# ImageNet normalisation: the assumption when a model comes without its preprocessing.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# About four whole-model weight sets of a mobile network: enough to flip between a few configs.
_MAX_WEIGHT_PLANS = 200


@dataclass
class LayerReport:
    method: str
    input_bits: int
    weight_bits: int
    input_per_channel: bool
    range: Range | None           # the static input range, None for dynamic or skipped layers
    data_free_range_from: str     # "bn" (producer statistics) or the fallback used


@dataclass
class QuantReport:
    """What quantize() decided, per layer, and where the graph analysis had to fall back."""
    config: QuantConfig
    layers: dict[str, LayerReport] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    propagation: Propagation | None = None
    # What the model was quantized from: its BN-folded float copy (the reference every analysis
    # compares with) and the data-free ranges searched so far. Shared and read-only.
    prepared: "Prepared | None" = field(default=None, repr=False)
    # liu-ptq: the searched intervals, the bits mixed precision chose and the attention rank inversions.
    liu: liu.LiuPlan | None = None
    # bias_images: how many distilled images the biases were fitted on (0: none), and what the fit
    # took from each layer's bias, which the int8 graph carries into the layers it re-quantizes.
    bias_images: int = 0
    bias_fit: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def reference(self) -> nn.Module:
        return self.prepared.folded


@dataclass
class Prepared:
    """What quantize() derives from the float model alone, reusable across configs.

    The BN-folded copy, its data-free input laws (which depend only on the tail settings) and the
    ranges chosen from them so far. Re-quantizing with other bits or methods then skips the
    folding, the graph analysis and every range already searched. Shared read-only.

    For a transformer, `folded` is the float copy with its attention written out (TapAttention),
    `vit` its structure and `matmul_laws` the data-free laws of the attention matmuls' operands.
    """
    source: nn.Module
    folded: nn.Module
    propagation: Propagation
    bounds_from: str
    key: tuple                  # prepared_key() of the configs it serves
    vit: VitGraph | None = None
    matmul_laws: dict[str, Dist] = field(default_factory=dict, repr=False)
    equalized: list[EqualizedPair] = field(default_factory=list)   # config.equalize: the pairs rescaled
    ranges: dict = field(default_factory=dict, repr=False)
    effects: dict = field(default_factory=dict, repr=False)    # RangeEffect of each searched range
    moments: dict = field(default_factory=dict, repr=False)    # law_moments of each layer input
    weights: OrderedDict = field(default_factory=OrderedDict, repr=False)   # bounded: they are big
    calibrated: dict = field(default_factory=dict, repr=False)   # ranges from `calibrated_on`'s images
    calibrated_on: tuple | None = field(default=None, repr=False)
    distilled: dict = field(default_factory=dict, repr=False)   # bias_images -> images distilled from BN
    activations: dict | None = field(default=None, repr=False)   # activated_layers of `folded`, once
    fit_targets: dict = field(default_factory=dict, repr=False)   # bias_images -> activated_means of `folded`

    def cached_weights(self, key, make):
        """Quantized weights of one layer for one setting, made once (methods share unfolded weights)."""
        if key not in self.weights:
            self.weights[key] = make()
            while len(self.weights) > _MAX_WEIGHT_PLANS:
                self.weights.popitem(last=False)
        self.weights.move_to_end(key)
        return self.weights[key]

    @staticmethod
    def _range_key(name: str, bits: int, per_channel: bool, config: QuantConfig) -> tuple:
        rule = (config.range_rule, config.clip_penalty if config.range_rule == "mse" else config.n_sigma)
        return name, bits, per_channel, rule

    def data_free_range(self, name: str, dist: Dist, bits: int, per_channel: bool, config: QuantConfig,
                        sums=None) -> Range:
        key = self._range_key(name, bits, per_channel, config)
        if key not in self.ranges:
            self.ranges[key] = (clip_range(dist, bits, per_channel, config.clip_penalty, sums) if key[3][0] == "mse"
                                else sigma_range(dist, config.n_sigma, per_channel))
        return self.ranges[key]

    def data_free_effect(self, name: str, dist: Dist, bits: int, per_channel: bool, config: QuantConfig) -> RangeEffect:
        """`range_effect` of the data-free range, kept: the fold decision and bias correction read it."""
        key = self._range_key(name, bits, per_channel, config)
        if key not in self.effects:
            self.effects[key] = range_effect(dist, self.data_free_range(name, dist, bits, per_channel, config), bits)
        return self.effects[key]

    def calibrated_ranges(self, images: torch.Tensor, count: int, wanted: dict[str, tuple]) -> dict[str, Range]:
        """Ranges of layers {name: (rule, bits, per_channel, percentile)} calibrated on images[:count].

        Min/max and percentile ranges do not depend on the bits, so they are kept for the same
        images; on any miss every wanted layer is observed again (the random subsample of each
        layer depends on which layers are observed together: the result is a fresh call's)."""
        self._calibrating_on(images, count)
        if any(_calib_key(n, w) not in self.calibrated for n, w in wanted.items()):
            obs = observe(self.folded, list(wanted), images[:count])
            for n, w in wanted.items():
                self.calibrated.setdefault(_calib_key(n, w), calibrated_range(obs[n], *w))
        return {n: self.calibrated[_calib_key(n, w)] for n, w in wanted.items()}

    def _calibrating_on(self, images: torch.Tensor, count: int) -> None:
        if self.calibrated_on is None or self.calibrated_on[0] is not images or self.calibrated_on[1] != count:
            self.calibrated, self.calibrated_on = {}, (images, count)

    def warm_calibrated(self, images: torch.Tensor, config: QuantConfig, bits=range(2, 17), lock=None) -> None:
        """Every layer's per-tensor calibrated ranges (each rule, these input bits) from one observation,
        as a model-wide calib-* config would get them, so that quantize() finds them. `lock` is held
        while the shared float model runs and the kept ranges change (one bit width at a time)."""
        if self.vit is not None:
            return
        lock = lock or contextlib.nullcontext()
        names = quantizable_layers(self.source)
        with lock:
            self._calibrating_on(images, config.calib_images)
            obs = observe(self.folded, names, images[:config.calib_images])
        for b in bits:
            with lock:
                if self.calibrated_on[0] is not images:
                    return
                for rule in ("minmax", "percentile", "mse"):
                    for n in names:
                        w = (rule, b, False, config.percentile)
                        if _calib_key(n, w) not in self.calibrated:
                            self.calibrated[_calib_key(n, w)] = calibrated_range(obs[n], *w)

    def distilled_images(self, n: int, progress: Callable[[float, str], None] | None = None,
                         copy_of_source: nn.Module | None = None) -> torch.Tensor:
        """n images distilled from the source model's BN statistics (disk-cached; kept here too).
        `copy_of_source`: an identical model to distill on where the source may be in use."""
        if n not in self.distilled:
            report = (lambda f, m: progress(0.9 * f, m)) if progress is not None else None
            self.distilled[n] = distilled_images(copy_of_source or self.source, n, *distill_bounds(self.source),
                                                 progress=report)
        return self.distilled[n]

    def fit_targets_for(self, n: int) -> dict[str, torch.Tensor]:
        """What `fit_biases` matches on the n distilled images: the float model's activated means,
        the same for every config (half the fit's cost, computed once)."""
        if self.activations is None:
            self.activations = activated_layers(analyse(self.folded))
        if n not in self.fit_targets:
            self.fit_targets[n] = activated_means(self.folded, self.distilled_images(n), self.activations)
        return self.fit_targets[n]

    def images_ready(self, n: int) -> bool:
        """Whether `distilled_images(n)` comes without distilling (held, shipped or cached)."""
        if n not in self.distilled:
            found = find_distilled(self.source, n, *distill_bounds(self.source))
            if found is None:
                return False
            self.distilled[n] = found
        return True

    def law_moments(self, name: str, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.moments:
            self.moments[name] = law_moments(dist)
        return self.moments[name]

    def warm(self, config: QuantConfig, bits=range(2, 17)) -> None:
        """Search every layer's data-free ranges at these bit widths now, so quantize() finds them."""
        for name, dist in self.propagation.inputs.items():
            sums = sorted_samples(dist) if config.range_rule == "mse" and not dist.use_bounds else None
            self.law_moments(name, dist)
            for b in bits:
                for per_channel in (True, False):
                    self.data_free_range(name, dist, b, per_channel, config, sums)
                    self.data_free_effect(name, dist, b, per_channel, config)


def _calib_key(name: str, wanted: tuple) -> tuple:
    """What a calibrated range depends on: min/max and percentile ranges not on the bits."""
    rule, bits, per_channel, percentile = wanted
    return name, rule, bits if rule == "mse" else None, per_channel, percentile if rule == "percentile" else None


def prepared_key(config: QuantConfig) -> tuple:
    """What a prepared model depends on: the laws' tails and whether the float model was equalized."""
    return config.tail, config.tail_depthwise, config.tail_sum, config.equalize


@torch.no_grad()
def prepare(model: nn.Module, config: QuantConfig | None = None) -> Prepared:
    """Fold BN into a copy of `model` (and equalize it if `config.equalize`), then derive its
    data-free input laws (for `config`'s tails)."""
    config = config or QuantConfig()
    lo, hi, bounds_from = input_bounds_of(model)
    vit = vit_graph(model)
    equalized = []
    if vit is not None:  # a transformer has no BatchNorm: its laws start at the LayerNorms
        folded = tap_attention(model)
        prop, matmul_laws = vit_laws(folded, vit, lo, hi, config.tail)
    else:
        folded = copy.deepcopy(model).eval()
        bn_stats = fold_batchnorm(folded, analyse(folded))
        if config.equalize:
            equalized = equalize(folded, analyse(folded), bn_stats)
        prop = propagate(analyse(folded), bn_stats, lo, hi, tail=config.tail, tail_depthwise=config.tail_depthwise,
                         tail_sum=config.tail_sum)
        matmul_laws = {}
    for p in folded.parameters():
        p.requires_grad_(False)
    return Prepared(model, folded, prop, bounds_from, prepared_key(config), vit, matmul_laws, equalized)


def methods_for(model: nn.Module) -> list[str]:
    """The methods that apply to `model` (liu-ptq only to vision transformers)."""
    return [m for m in METHODS if m not in TRANSFORMER_ONLY or vit_graph(model) is not None]


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def check_config(model: nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError if `config` cannot quantize `model`: an override names a layer it does not
    have, or a method (model-wide or per layer) does not apply to it."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    config.check_layers(quantizable_layers(model))
    used = {config.method, *(o.method for o in config.overrides.values() if o.method)}
    if used & set(TRANSFORMER_ONLY) and vit_graph(model) is None:
        raise ConfigError(f"method {sorted(used & set(TRANSFORMER_ONLY))[0]!r} is for vision transformers; "
                          f"{type(model).__name__} is not one")


def distill_bounds(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The normalised input's per-channel bounds and the size images are distilled at for `model`."""
    lo, hi, _ = input_bounds_of(model)
    return lo, hi, getattr(getattr(model, "spiq_preprocess", None), "crop", 224)


def input_bounds_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    pre = getattr(model, "spiq_preprocess", None)
    if pre is not None:
        lo, hi = pre.input_bounds()
        return lo, hi, "preprocess"
    mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
    return -mean / std, (1 - mean) / std, "ImageNet mean/std assumed"


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _output_mean(layer: nn.Module, weight: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """Per output channel, the layer's response (without bias) to a constant input x_mean."""
    if weight.dim() == 2:
        return weight @ x_mean
    # taps first, then channels: the summation order the benchmarks were run with
    return (weight.sum((2, 3)) * broadcast_input(x_mean, weight, layer.groups)[:, :, 0, 0]).sum(1)


def plan_layer(layer: nn.Module, rng: Range | None, input_bits: int, input_per_channel: bool, weight_bits: int,
               weight_per_channel: bool, config: QuantConfig, memo: Callable | None = None):
    """Input quantizer and weights of one layer: (InputQuant, weight codes, weight scale, float weight)."""
    if rng is not None:
        scale, zero = input_scale_zero(rng, input_bits)
        inq = InputQuant("static", input_bits, input_per_channel, scale, zero, channel_axis(layer))
    else:
        inq = InputQuant("dynamic", input_bits, input_per_channel, axis=channel_axis(layer))
    fold = inq.scale if inq.mode == "static" and inq.per_channel else None
    def make():
        return make_weights(layer, weight_bits, weight_per_channel, config.weight_clip, fold, config.weight_rounding)

    codes, w_scale, w_sim = memo(make) if memo is not None else make()
    return inq, codes, w_scale, w_sim


def _expected_output_error(layer: nn.Module, w_float: torch.Tensor, w_sim: torch.Tensor, mean_sq: torch.Tensor,
                           effect: RangeEffect) -> float:
    """E‖y − ŷ‖² under the input law (E[x²] per channel), input and weight errors taken as independent."""
    g = getattr(layer, "groups", 1)
    return float((effect.err2 * per_input_channel(w_float ** 2, g)).sum()
                 + (mean_sq * per_input_channel((w_sim - w_float) ** 2, g)).sum())


def bias_shift(layer: nn.Module, w_float: torch.Tensor, w_sim: torch.Tensor, mean_x: torch.Tensor,
               mean_xq: torch.Tensor) -> torch.Tensor:
    """The expected output error, E[ŷ − y], that bias correction subtracts from the layer's bias."""
    return _output_mean(layer, w_sim, mean_xq) - _output_mean(layer, w_float, mean_x)


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib_data: torch.Tensor | None = None,
             progress: Callable[[float, str], None] | None = None, prepared: Prepared | None = None) -> nn.Module:
    """Return a quantized copy of `model` (eval mode); `model` itself is left as it was.

    `calib_data` (N, 3, H, W) preprocessed images are needed only by the calib-* methods and liu-ptq.
    `prepared` is `prepare(model, config)` kept from an earlier call, to re-quantize fast. The
    returned model carries `spiq_report` (a QuantReport) and `spiq_config`.
    """
    check_config(model, config)
    names = quantizable_layers(model)
    settings = {n: config.for_layer(n) for n in names}
    used = {s.method for s in settings.values() if not s.skip}
    if used & set(NEEDS_CALIBRATION) and calib_data is None:
        raise ConfigError(f"method {sorted(used & set(NEEDS_CALIBRATION))[0]!r} needs calibration images (calib_data)")
    if prepared is not None and prepared.source is not model:
        raise ValueError("`prepared` was made from another model")
    if prepared is None or prepared.key != prepared_key(config):
        prepared = prepare(model, config)
    vit = prepared.vit

    q = copy.deepcopy(prepared.folded)
    prop = prepared.propagation
    report = QuantReport(config, fallbacks=dict(prop.fallbacks), propagation=prop, prepared=prepared)
    if prepared.bounds_from != "preprocess":
        report.fallbacks["<input>"] = prepared.bounds_from

    sites = matmul_sites(vit) if vit is not None else {}
    calib_layers = [n for n, s in settings.items() if s.method in CALIBRATED and not s.skip]
    calib_sites = [m for m, n in sites.items() if n in calib_layers]
    wanted = {n: (settings[n].method.split("-", 1)[1], settings[n].input_bits, settings[n].input_per_channel,
                  config.percentile) for n in calib_layers}
    observed, calibrated = {}, {}
    if calib_sites:   # a transformer's matmul operands: observed with its layers, every time
        observed = observe(q, calib_layers + calib_sites, calib_data[: config.calib_images])
        calibrated = {n: calibrated_range(observed[n], *w) for n, w in wanted.items()}
    elif wanted:
        calibrated = prepared.calibrated_ranges(calib_data, config.calib_images, wanted)
    searched = 0.0
    fit_biases_on = None
    bias_images = bias_images_for(config, model, vit)
    if bias_images and (vit is not None or not has_batchnorm(model)):
        report.fallbacks["<bias_images>"] = "no BatchNorm to distill images from: law bias correction only"
    elif bias_images:
        if not prepared.images_ready(bias_images):
            searched = 0.9   # of the progress bar: distilling is nearly all the work
        fit_biases_on = prepared.distilled_images(bias_images, progress)
    if "liu-ptq" in used:
        report.liu = _liu_plan(prepared, settings, config, calib_data, progress)
        searched = 0.9  # of the progress bar: the search is nearly all the work

    for i, name in enumerate(names):
        s = settings[name]
        if progress is not None:
            progress(searched + (1 - searched) * i / len(names), f"quantizing {name}")
        if s.skip:
            continue
        layer = q.get_submodule(name)
        if s.method == "liu-ptq":
            report.layers[name] = _apply_liu(q, name, layer, report.liu.layers[name])
            continue
        dist = prop.inputs.get(name) or unknown_input_dist(_in_channels(layer), config.tail)
        rng: Range | None = None
        if s.method in DATA_FREE:
            rng = prepared.data_free_range(name, dist, s.input_bits, s.input_per_channel, config)
        elif s.method in CALIBRATED:
            rng = calibrated[name]
        w_float = layer.weight.detach().clone()

        def memo(rng, per_channel, name=name, s=s):
            folds = rng is not None and per_channel
            if folds and s.method not in DATA_FREE:
                return None  # scales from calibration images: not worth keeping
            key = (name, s.weight_bits, s.weight_per_channel, config.weight_clip, config.weight_rounding,
                   (s.input_bits, config.range_rule, config.clip_penalty, config.n_sigma) if folds else None)
            return lambda make: prepared.cached_weights(key, make)

        inq, codes, w_scale, w_sim = plan_layer(layer, rng, s.input_bits, s.input_per_channel, s.weight_bits,
                                                s.weight_per_channel, config, memo(rng, s.input_per_channel))
        if s.method == "spiq" and inq.per_channel and config.fold == "auto":
            # Per-channel input scales cost weight precision once folded. Where the data-free law says
            # the input gain is smaller than that cost (high input bits, low weight bits), one range
            # per tensor is the better static quantizer for this layer.
            rng_t = prepared.data_free_range(name, dist, s.input_bits, False, config)
            alt = plan_layer(layer, rng_t, s.input_bits, False, s.weight_bits, s.weight_per_channel, config,
                             memo(rng_t, False))
            mean_sq = prepared.law_moments(name, dist)[1]
            if _expected_output_error(layer, w_float, alt[3], mean_sq,
                                      prepared.data_free_effect(name, dist, s.input_bits, False, config)) < \
                    _expected_output_error(layer, w_float, w_sim, mean_sq,
                                           prepared.data_free_effect(name, dist, s.input_bits, True, config)):
                rng, (inq, codes, w_scale, w_sim) = rng_t, alt
        folded = inq.mode == "static" and inq.per_channel
        layer.weight.data = w_sim
        if config.bias_correction:
            mean_x = prepared.law_moments(name, dist)[0]
            if rng is None:
                mean_xq = mean_x
            elif s.method in DATA_FREE:
                mean_xq = prepared.data_free_effect(name, dist, s.input_bits, inq.per_channel, config).mean_q
            else:
                mean_xq = range_effect(dist, rng, s.input_bits).mean_q
            shift = bias_shift(layer, w_float, w_sim, mean_x, mean_xq)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w_sim.shape[0]), requires_grad=False)
            layer.bias.data = layer.bias.data - shift
        report.layers[name] = LayerReport(s.method, s.input_bits, s.weight_bits, inq.per_channel, rng,
                                          "bn" if name in prop.inputs else report.fallbacks.get(name, "fallback"))
        q.set_submodule(name, QuantLayer(layer, inq, codes, w_scale, folded, name))
    for site, owner in sites.items():
        _quantize_matmul(q.get_submodule(site), site, settings[owner], prepared, config, observed, report.liu)
    if fit_biases_on is not None:
        report.bias_fit = fit_biases(q, prepared.fit_targets_for(bias_images), fit_biases_on, prepared.activations)
        report.bias_images = bias_images
    if progress is not None:
        progress(1.0, "done")
    q.spiq_report = report
    q.spiq_config = config
    if config.int8_graph:
        if not _INT8_GRAPH:
            raise ConfigError("int8_graph needs spiq.export (import spiq)")
        q = _INT8_GRAPH[0](q)
    return q


# The int8 graph's simulation is built by spiq.export, a layer above this one: it registers its
# builder here when imported (`import spiq` imports it), so quantize() needs no import of it.
_INT8_GRAPH: list[Callable[[nn.Module], nn.Module]] = []


def register_int8_graph(build: Callable[[nn.Module], nn.Module]) -> None:
    """What QuantConfig(int8_graph=True) applies to the quantized model (raises ConfigError)."""
    _INT8_GRAPH[:] = [build]


def bias_images_for(config: QuantConfig, model: nn.Module, vit: VitGraph | None = None) -> int:
    """config.bias_images, with None resolved: AUTO_BIAS_IMAGES where the model has BatchNorm
    statistics to distill images from, none where it has not."""
    if config.bias_images is not None:
        return config.bias_images
    return AUTO_BIAS_IMAGES if vit is None and has_batchnorm(model) else 0


def activated_layers(graph: ModelGraph) -> dict[str, nn.Module]:
    """Each layer whose output goes straight into an activation, and that activation. The others
    (residual branches, logits) are left out of `fit_biases`: corrected together, the residual
    branches of EfficientNet-Lite0's stage 5 made every layer after them worse."""
    out = {}
    for name, layer in graph.layers.items():
        node = layer.node
        while len(node.users) == 1:
            (node,) = node.users
            mod = graph.gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(mod, ACTIVATIONS):
                out[name] = mod
                break
            if not is_passthrough(graph.gm, node):
                break
    return out


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3)) if t.dim() == 4 else t.reshape(-1, t.shape[-1]).mean(0)


@torch.no_grad()
def activated_means(model: nn.Module, images: torch.Tensor, activations: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per channel, the mean over `images` of each layer's output through its activation."""
    means = {}

    def record(name, act):
        def hook(_mod, _args, out):
            means[name] = _channel_mean(act(out.clone()))   # clone: the activation may work in place
        return hook

    run_with_hooks(model, {n: record(n, a) for n, a in activations.items()}, images, batch=len(images))
    return means


@torch.no_grad()
def fit_biases(q: nn.Module, targets: dict[str, torch.Tensor], images: torch.Tensor,
               activations: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Sequential bias correction of `q` in place: in one pass over `images`, each layer of
    `activations` has its bias shifted by the gap between the per-channel mean of its activated
    output and `targets` (the float model's `activated_means` on the same images), and the layers
    after it see the corrected output.

    The per-layer law correction sees only a layer's own rounding; this sees the mean error the
    layers before it left, which grows with depth (5-15 % of the error power of blocks 2-6 of
    EfficientNet-Lite0 at 5 bits). Shifting by the gap after the activation rather than before it
    leaves alone the values the activation zeroes or caps. Returns each layer's shift (subtracted).
    """
    shifts = {}

    def correct(name, act):
        def hook(mod, _args, out):
            gap = _channel_mean(act(out.clone())) - targets[name]
            layer = getattr(mod, "layer", mod)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(gap), requires_grad=False)
            layer.bias.data = layer.bias.data - gap
            shifts[name] = gap
            return out - (gap.view(1, -1, 1, 1) if out.dim() == 4 else gap)
        return hook

    run_with_hooks(q, {n: correct(n, a) for n, a in activations.items()}, images, batch=len(images))
    return shifts


def _liu_plan(prepared: Prepared, settings: dict, config: QuantConfig, calib_data: torch.Tensor,
              progress: Callable | None) -> liu.LiuPlan:
    calib = liu.collect(prepared.folded, prepared.vit, calib_data[: config.calib_images], config.search_tokens)

    def bits(name):
        s = settings[name]
        return (s.weight_bits, s.input_bits) if s.method == "liu-ptq" and not s.skip else None

    search = liu.LiuSettings(config.search_points, config.search_rounds, config.rank_weight, config.rank_margin,
                             config.rank_pairs, config.bias_correction)
    sub = (lambda f, what: progress(0.9 * f, what)) if progress is not None else None
    return liu.plan(prepared.folded, prepared.vit, calib, bits, search, config.mixed_precision,
                    memo=prepared.ranges, progress=sub)


def _apply_liu(q: nn.Module, name: str, layer: nn.Module, site: liu.Site) -> LayerReport:
    codes, w_scale = site.weight_codes(layer.weight.detach())
    layer.weight.data = codes * w_scale
    if site.bias_shift is not None:
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(codes.shape[0]), requires_grad=False)
        layer.bias.data = layer.bias.data + site.bias_shift
    inq = liu.input_quant(site.search.delta_a, site.kind_a, site.bits_a, channel_axis(layer))
    lo, hi = liu.levels(site.kind_a, site.bits_a)
    rng = Range(torch.tensor(lo * site.search.delta_a), torch.tensor(hi * site.search.delta_a))
    q.set_submodule(name, QuantLayer(layer, inq, codes, w_scale, False, name))
    return LayerReport("liu-ptq", site.bits_a, site.bits_b, False, rng, "calibration")


def _quantize_matmul(tap: nn.Module, site: str, s, prepared: Prepared, config: QuantConfig, observed: dict,
                     plan: liu.LiuPlan | None) -> None:
    """Set the quantizer of one attention matmul operand; it follows its block's qkv layer."""
    if s.skip:
        return
    attn, operand = site.rsplit(".", 1)
    if s.method == "liu-ptq":
        found = plan.matmuls[f"{attn}.qk" if operand in ("q_in", "k_in") else f"{attn}.pv"]
        first = operand in ("q_in", "p_in")
        delta = found.search.delta_a if first else found.search.delta_b
        kind = found.kind_a if first else found.kind_b
        tap.quant = liu.input_quant(delta, kind, found.bits_a if first else found.bits_b)
        return
    if s.method in DATA_FREE:
        # The attention map lies in [0, 1] whatever the data; q, k and v follow their LayerNorm's law.
        rng = (Range(torch.tensor(0.0), torch.tensor(1.0)) if operand == "p_in" else
               prepared.data_free_range(site, prepared.matmul_laws[site], s.input_bits, False, config))
    elif s.method in CALIBRATED:
        rng = calibrated_range(observed[site], s.method.split("-", 1)[1], s.input_bits, False, config.percentile)
    else:
        tap.quant = InputQuant("dynamic", s.input_bits, s.input_per_channel, axis=-1)
        return
    scale, zero = input_scale_zero(rng, s.input_bits)
    tap.quant = InputQuant("static", s.input_bits, False, scale, zero, -1)
