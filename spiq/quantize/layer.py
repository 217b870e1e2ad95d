"""One layer's quantization: its input quantizer from its method, its weights (folding per-channel
input scales into them), and the bias correction from its input law."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from spiq.config import LayerSettings, QuantConfig
from spiq.core.quant import Grid, InputQuant, QuantLayer, channel_axis, input_scale_zero, make_weights
from spiq.core.tensors import Range, broadcast_input, per_input_channel
from spiq.methods.liu import LiuPlan, Site
from spiq.methods.liu_intervals import input_quant
from spiq.methods.registry import LayerInput, Method
from spiq.quantize.prepared import Prepared
from spiq.quantize.report import LayerReport, QuantReport
from spiq.ranges.laws import RangeEffect, calibrated_range, range_effect, unknown_input_dist


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


def quantize_layer(q: nn.Module, name: str, s: LayerSettings, method: Method, prepared: Prepared,
                   config: QuantConfig, calibrated: dict[str, Range], report: QuantReport) -> None:
    """Quantize layer `name` of `q` in place by its method, and say how in `report`."""
    layer = q.get_submodule(name)
    if method.search is not None:
        report.layers[name] = _take_searched(q, name, layer, method, report.liu.layers[name])
        return
    prop = prepared.propagation
    dist = prop.inputs.get(name) or unknown_input_dist(_in_channels(layer), config.tail)
    x = LayerInput(name, s.input_bits, s.input_per_channel, config, dist, prepared, calibrated)
    rng = method.input_range(x)
    w_float = layer.weight.detach().clone()
    rng, (inq, codes, w_scale, w_sim) = _input_and_weights(layer, x, rng, s, method, prepared, w_float)
    folded = inq.mode == "static" and inq.per_channel
    layer.weight.data = w_sim
    if config.bias_correction:
        _correct_bias(layer, x, rng, inq.per_channel, method, prepared, w_float, w_sim)
    report.layers[name] = LayerReport(s.method, s.input_bits, s.weight_bits, inq.per_channel, rng,
                                      "bn" if name in prop.inputs else report.fallbacks.get(name, "fallback"))
    q.set_submodule(name, QuantLayer(layer, inq, codes, w_scale, folded, name))


def _input_and_weights(layer: nn.Module, x: LayerInput, rng: Range | None, s: LayerSettings, method: Method,
                       prepared: Prepared, w_float: torch.Tensor) -> tuple[Range | None, tuple]:
    """The layer's input range and plan_layer's (InputQuant, codes, weight scale, weight), after the
    method's fold choice."""
    config = x.config

    def memo(rng, per_channel):
        folds = rng is not None and per_channel
        if folds and not method.data_free:
            return None  # scales from calibration images: not worth keeping
        key = (x.name, s.weight_bits, s.weight_per_channel, config.weight_clip, config.weight_rounding,
               (s.input_bits, config.range_rule, config.clip_penalty, config.n_sigma) if folds else None)
        return lambda make: prepared.cached_weights(key, make)

    planned = plan_layer(layer, rng, s.input_bits, s.input_per_channel, s.weight_bits, s.weight_per_channel, config,
                         memo(rng, s.input_per_channel))
    if not (method.fold_choice and planned[0].per_channel and config.fold == "auto"):
        return rng, planned
    # Per-channel input scales cost weight precision once folded. Where the data-free law says the
    # input gain is smaller than that cost (high input bits, low weight bits), one range per tensor
    # is the better static quantizer for this layer.
    rng_t = method.input_range(replace(x, per_channel=False))
    alt = plan_layer(layer, rng_t, s.input_bits, False, s.weight_bits, s.weight_per_channel, config, memo(rng_t, False))
    mean_sq = prepared.law_moments(x.name, x.dist)[1]
    per_tensor = _expected_output_error(layer, w_float, alt[3], mean_sq,
                                        prepared.data_free_effect(x.name, x.dist, x.bits, False, config))
    per_channel = _expected_output_error(layer, w_float, planned[3], mean_sq,
                                         prepared.data_free_effect(x.name, x.dist, x.bits, True, config))
    return (rng_t, alt) if per_tensor < per_channel else (rng, planned)


def _correct_bias(layer: nn.Module, x: LayerInput, rng: Range | None, per_channel: bool, method: Method,
                  prepared: Prepared, w_float: torch.Tensor, w_sim: torch.Tensor) -> None:
    """Subtract from the layer's bias its expected output error under the input law."""
    mean_x = prepared.law_moments(x.name, x.dist)[0]
    if rng is None:
        mean_xq = mean_x
    elif method.data_free:   # the same effect, kept with the range
        mean_xq = prepared.data_free_effect(x.name, x.dist, x.bits, per_channel, x.config).mean_q
    else:
        mean_xq = range_effect(x.dist, rng, x.bits).mean_q
    shift = bias_shift(layer, w_float, w_sim, mean_x, mean_xq)
    if layer.bias is None:
        layer.bias = nn.Parameter(w_sim.new_zeros(w_sim.shape[0]), requires_grad=False)
    layer.bias.data = layer.bias.data - shift


def _take_searched(q: nn.Module, name: str, layer: nn.Module, method: Method, site: Site) -> LayerReport:
    """Quantize a layer with the intervals its method searched (liu-ptq), bias shift included."""
    codes, w_scale = site.weight_codes(layer.weight.detach())
    layer.weight.data = codes * w_scale
    if site.bias_shift is not None:
        if layer.bias is None:
            layer.bias = nn.Parameter(codes.new_zeros(codes.shape[0]), requires_grad=False)
        layer.bias.data = layer.bias.data + site.bias_shift
    inq = input_quant(site.search.delta_a, site.kind_a, site.bits_a, channel_axis(layer))
    lo, hi = Grid(site.kind_a).levels(site.bits_a)
    rng = Range(torch.tensor(lo * site.search.delta_a), torch.tensor(hi * site.search.delta_a))
    q.set_submodule(name, QuantLayer(layer, inq, codes, w_scale, False, name))
    return LayerReport(method.name, site.bits_a, site.bits_b, False, rng, "calibration")


def quantize_matmul(tap: nn.Module, site: str, s: LayerSettings, method: Method, prepared: Prepared,
                    config: QuantConfig, observed: dict, plan: LiuPlan | None) -> None:
    """Set the quantizer of one attention matmul operand; it follows its block's qkv layer."""
    if s.skip:
        return
    attn, operand = site.rsplit(".", 1)
    if method.search is not None:
        found = plan.matmuls[f"{attn}.qk" if operand in ("q_in", "k_in") else f"{attn}.pv"]
        first = operand in ("q_in", "p_in")
        delta = found.search.delta_a if first else found.search.delta_b
        kind = found.kind_a if first else found.kind_b
        tap.quant = input_quant(delta, kind, found.bits_a if first else found.bits_b)
        return
    calibrated = {}
    if method.calibration is not None:
        calibrated[site] = calibrated_range(observed[site], *method.calibration(s.input_bits, False, config))
    # the attention map lies in [0, 1] whatever the data
    bounds = Range(torch.tensor(0.0), torch.tensor(1.0)) if operand == "p_in" else None
    rng = method.input_range(LayerInput(site, s.input_bits, False, config, prepared.matmul_laws.get(site), prepared,
                                        calibrated, bounds))
    if rng is None:
        tap.quant = InputQuant("dynamic", s.input_bits, s.input_per_channel, axis=-1)
        return
    scale, zero = input_scale_zero(rng, s.input_bits)
    tap.quant = InputQuant("static", s.input_bits, False, scale, zero, -1)
