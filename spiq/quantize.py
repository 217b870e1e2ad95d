"""`quantize(model, config)`: a quantized copy of a float model; the original is never touched."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import CALIBRATED, DATA_FREE, ConfigError, QuantConfig
from .fold import fold_batchnorm
from .graph import QUANTIZABLE, analyse
from .qlayers import InputQuant, QuantLayer, input_scale_zero, make_weights
from .ranges import (Dist, Propagation, Range, broadcast_input, calibrated_range, clip_range, expected_value, observe, propagate,
                     quantized_samples, sigma_range)

# ImageNet normalisation: the assumption when a model comes without its preprocessing.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def input_bounds_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    pre = getattr(model, "spiq_preprocess", None)
    if pre is not None:
        lo, hi = pre.input_bounds()
        return lo, hi, "preprocess"
    mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
    return -mean / std, (1 - mean) / std, "ImageNet mean/std assumed"


def _fallback_dist(channels: int, tail: str) -> Dist:
    # Unknown producer: assume a unit-variance, zero-mean input, unbounded.
    inf = torch.full((channels,), float("inf"))
    return Dist(torch.zeros(channels), torch.ones(channels), -inf, inf, tail=tail)


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _output_mean(layer: nn.Module, weight: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """Per output channel, the layer's response (without bias) to a constant input x_mean."""
    if weight.dim() == 2:
        return weight @ x_mean
    # taps first, then channels: the summation order the benchmarks were run with
    return (weight.sum((2, 3)) * broadcast_input(x_mean, weight, layer.groups)[:, :, 0, 0]).sum(1)


def _plan(layer: nn.Module, rng: Range | None, input_bits: int, input_per_channel: bool, weight_bits: int,
          weight_per_channel: bool, config: QuantConfig):
    """Input quantizer and weights of one layer: (InputQuant, weight codes, weight scale, float weight)."""
    if rng is not None:
        scale, zero = input_scale_zero(rng, input_bits)
        inq = InputQuant("static", input_bits, input_per_channel, scale, zero)
    else:
        inq = InputQuant("dynamic", input_bits, input_per_channel)
    fold = inq.scale if inq.mode == "static" and inq.per_channel else None
    codes, w_scale, w_sim = make_weights(layer, weight_bits, weight_per_channel, config.weight_clip, fold,
                                         config.weight_rounding)
    return inq, codes, w_scale, w_sim


def _per_input_channel(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a weight-shaped tensor over everything but the input channel: (C,)."""
    if t.dim() == 2:
        return t.sum(0)
    o, cg = t.shape[:2]
    return t.reshape(groups, o // groups, cg, -1).sum((1, 3)).reshape(-1)


def _expected_output_error(layer: nn.Module, w_float: torch.Tensor, w_sim: torch.Tensor, dist: Dist,
                           rng: Range, bits: int) -> float:
    """E‖y − ŷ‖² under the input law, input and weight errors taken as independent."""
    x, w, xq = quantized_samples(dist, rng, bits)
    e2 = (((xq - x) ** 2) * w).sum(1)
    m2 = ((x ** 2) * w).sum(1)
    g = getattr(layer, "groups", 1)
    return float((e2 * _per_input_channel(w_float ** 2, g)).sum()
                 + (m2 * _per_input_channel((w_sim - w_float) ** 2, g)).sum())


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib_data: torch.Tensor | None = None,
             progress: Callable[[float, str], None] | None = None) -> nn.Module:
    """Return a quantized copy of `model` (eval mode); `model` itself is left as it was.

    `calib_data` (N, 3, H, W) preprocessed images are needed only by the calib-* methods. The
    returned model carries `spiq_report` (a QuantReport) and `spiq_config`.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    names = quantizable_layers(model)
    config.check_layers(names)
    settings = {n: config.for_layer(n) for n in names}
    if any(s.method in CALIBRATED and not s.skip for s in settings.values()) and calib_data is None:
        raise ConfigError(f"method {config.method!r} needs calibration images (calib_data)")

    q = copy.deepcopy(model).eval()
    graph = analyse(q)
    bn_stats = fold_batchnorm(q, graph)
    graph = analyse(q)
    lo, hi, bounds_from = input_bounds_of(model)
    prop = propagate(graph, bn_stats, lo, hi, tail=config.tail, tail_depthwise=config.tail_depthwise,
                     tail_sum=config.tail_sum)
    report = QuantReport(config, fallbacks=dict(prop.fallbacks), propagation=prop)
    if bounds_from != "preprocess":
        report.fallbacks["<input>"] = bounds_from

    calib_layers = [n for n, s in settings.items() if s.method in CALIBRATED and not s.skip]
    observed = observe(q, calib_layers, calib_data[: config.calib_images]) if calib_layers else {}

    for i, name in enumerate(names):
        s = settings[name]
        if progress is not None:
            progress(i / len(names), f"quantizing {name}")
        if s.skip:
            continue
        layer = q.get_submodule(name)
        dist = prop.inputs.get(name) or _fallback_dist(_in_channels(layer), config.tail)
        rng: Range | None = None
        if s.method in DATA_FREE:
            rng = (clip_range(dist, s.input_bits, s.input_per_channel, config.clip_penalty)
                   if config.range_rule == "mse" else sigma_range(dist, config.n_sigma, s.input_per_channel))
        elif s.method in CALIBRATED:
            rule = s.method.split("-", 1)[1]
            rng = calibrated_range(observed[name], rule, s.input_bits, s.input_per_channel, config.percentile)
        w_float = layer.weight.detach().clone()
        inq, codes, w_scale, w_sim = _plan(layer, rng, s.input_bits, s.input_per_channel, s.weight_bits,
                                           s.weight_per_channel, config)
        if s.method == "spiq" and inq.per_channel and config.fold == "auto":
            # Per-channel input scales cost weight precision once folded. Where the data-free law says
            # the input gain is smaller than that cost (high input bits, low weight bits), one range
            # per tensor is the better static quantizer for this layer.
            rng_t = clip_range(dist, s.input_bits, False, config.clip_penalty)
            alt = _plan(layer, rng_t, s.input_bits, False, s.weight_bits, s.weight_per_channel, config)
            if _expected_output_error(layer, w_float, alt[3], dist, rng_t, s.input_bits) < \
                    _expected_output_error(layer, w_float, w_sim, dist, rng, s.input_bits):
                rng, (inq, codes, w_scale, w_sim) = rng_t, alt
        folded = inq.mode == "static" and inq.per_channel
        layer.weight.data = w_sim
        if config.bias_correction:
            mean_x = expected_value(dist)
            mean_xq = expected_value(dist, rng, s.input_bits) if rng is not None else mean_x
            shift = _output_mean(layer, w_sim, mean_xq) - _output_mean(layer, w_float, mean_x)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w_sim.shape[0]), requires_grad=False)
            layer.bias.data = layer.bias.data - shift
        report.layers[name] = LayerReport(s.method, s.input_bits, s.weight_bits, inq.per_channel, rng,
                                          "bn" if name in prop.inputs else report.fallbacks.get(name, "fallback"))
        q.set_submodule(name, QuantLayer(layer, inq, codes, w_scale, folded, name))
    if progress is not None:
        progress(1.0, "done")
    q.spiq_report = report
    q.spiq_config = config
    return q
