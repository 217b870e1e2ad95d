"""The handler of the methods that choose each input's range on its own (SPIQ, static, calibrated,
dynamic): per layer, the input quantizer from the method's range, the weights (per-channel input
scales folded into them), and the bias correction from the input's law. Nothing here depends on
which of those methods it is: each gives its range (and, if data-free, the spec that memoises it)."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch
from torch import nn

from spiq.config import LayerSettings, QuantConfig
from spiq.core.quant import InputQuant, channel_axis, input_scale_zero, make_weights
from spiq.core.tensors import Range, broadcast_input, per_input_channel
from spiq.methods.plans import LayerInput, LayerPlan, Memo, MethodPlan, PlanContext
from spiq.models.vit import matmul_sites
from spiq.ranges.laws import Dist, RangeEffect, law_moments, range_effect, unknown_input_dist


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weights are quantized: what their memo is keyed by, with the layer's name and
    the spec of the input range folded into them."""
    bits: int
    per_channel: bool
    clip: str
    rounding: str


def law_effect(memo: Memo, name: str, dist: Dist, spec: Hashable | None, rng: Range, bits: int) -> RangeEffect:
    """What `rng` does to the input's law (the mean the layer sees, the error added): kept with a
    data-free range (`spec`), computed afresh for one measured on images."""
    if spec is None:
        return range_effect(dist, rng, bits)
    return memo(("effect", name, spec), lambda: range_effect(dist, rng, bits))


def memo_moments(memo: Memo, name: str, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x] and E[x²] per channel of the input's law, kept."""
    return memo(("moments", name), lambda: law_moments(dist))


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def output_mean(layer: nn.Module, weight: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """Per output channel, the layer's response (without bias) to a constant input x_mean."""
    if weight.dim() == 2:
        return weight @ x_mean
    # taps first, then channels: the summation order the benchmarks were run with
    return (weight.sum((2, 3)) * broadcast_input(x_mean, weight, layer.groups)[:, :, 0, 0]).sum(1)


def bias_shift(layer: nn.Module, w_float: torch.Tensor, w_sim: torch.Tensor, mean_x: torch.Tensor,
               mean_xq: torch.Tensor) -> torch.Tensor:
    """The expected output error, E[ŷ − y], that bias correction subtracts from the layer's bias."""
    return output_mean(layer, w_sim, mean_xq) - output_mean(layer, w_float, mean_x)


def input_quant(rng: Range | None, bits: int, per_channel: bool, axis: int) -> InputQuant:
    """The static quantizer of `rng`, or a dynamic one where there is no range (channels on `axis`)."""
    if rng is None:
        return InputQuant("dynamic", bits, per_channel, axis=axis)
    scale, zero = input_scale_zero(rng, bits)
    return InputQuant("static", bits, per_channel, scale, zero, axis)


def layer_weights(layer: nn.Module, inq: InputQuant, spec: WeightSpec, memo=None):
    """(codes, scale, float weight) of `layer` for input quantizer `inq`: its per-channel static
    scales folded in. `memo(make)` keeps them."""
    fold = inq.scale if inq.mode == "static" and inq.per_channel else None

    def make():
        return make_weights(layer, spec.bits, spec.per_channel, spec.clip, fold, spec.rounding)

    return memo(make) if memo is not None else make()


def weight_spec(s: LayerSettings, config: QuantConfig) -> WeightSpec:
    return WeightSpec(s.weight_bits, s.weight_per_channel, config.weight_clip, config.weight_rounding)


class _Layer:
    """One layer's input and the method's view of it, while its plan is made."""

    def __init__(self, ctx: PlanContext, method, name: str):
        self.ctx, self.method, self.name = ctx, method, name
        self.s = ctx.settings[name]
        self.layer = ctx.reference.get_submodule(name)
        dist = ctx.propagation.inputs.get(name) or unknown_input_dist(_in_channels(self.layer), ctx.config.tail)
        self.x = LayerInput(name, self.s.input_bits, self.s.input_per_channel, ctx.config, dist, ctx.memo,
                            ctx.calibrated)

    def range_spec(self, per_channel: bool) -> Hashable | None:
        """What a data-free range is memoised by; None for one measured on images or per sample."""
        spec = self.method.range_spec
        return spec(self.x.bits, per_channel, self.x.config) if spec is not None else None

    def range(self, per_channel: bool) -> Range | None:
        return self.method.input_range(replace(self.x, per_channel=per_channel))

    def effect(self, rng: Range, per_channel: bool) -> RangeEffect:
        return law_effect(self.ctx.memo, self.name, self.x.dist, self.range_spec(per_channel), rng, self.x.bits)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return memo_moments(self.ctx.memo, self.name, self.x.dist)

    def weights(self, rng: Range | None, per_channel: bool):
        inq = input_quant(rng, self.x.bits, per_channel, channel_axis(self.layer))
        folds = rng is not None and per_channel
        spec = weight_spec(self.s, self.x.config)
        fold_spec = self.range_spec(per_channel) if folds else None
        memo = None if folds and fold_spec is None else (   # scales from calibration images: not worth keeping
            lambda make: self.ctx.memo.weights(("weights", self.name, spec, fold_spec), make))
        return inq, layer_weights(self.layer, inq, spec, memo)


def _expected_output_error(layer: nn.Module, w_float: torch.Tensor, w_sim: torch.Tensor, mean_sq: torch.Tensor,
                           effect: RangeEffect) -> float:
    """E‖y − ŷ‖² under the input law (E[x²] per channel), input and weight errors taken as independent."""
    g = getattr(layer, "groups", 1)
    return float((effect.err2 * per_input_channel(w_float ** 2, g)).sum()
                 + (mean_sq * per_input_channel((w_sim - w_float) ** 2, g)).sum())


def _choose_fold(lay: _Layer, rng: Range | None, planned) -> tuple[Range | None, tuple, tuple[str, ...]]:
    """The method's range and weights, or, where it may choose (fold="auto") and the data-free law
    says per-tensor does better, the per-tensor ones; with the reason."""
    inq = planned[0]
    if not (lay.method.fold_choice and inq.per_channel and lay.x.config.fold == "auto"):
        return rng, planned, ()
    # Per-channel input scales cost weight precision once folded. Where the data-free law says the
    # input gain is smaller than that cost (high input bits, low weight bits), one range per tensor
    # is the better static quantizer for this layer.
    rng_t = lay.range(False)
    alt = lay.weights(rng_t, False)
    w_float, mean_sq = lay.layer.weight.detach(), lay.moments()[1]
    per_tensor = _expected_output_error(lay.layer, w_float, alt[1][2], mean_sq, lay.effect(rng_t, False))
    per_channel = _expected_output_error(lay.layer, w_float, planned[1][2], mean_sq, lay.effect(rng, True))
    if per_tensor < per_channel:
        return rng_t, alt, (f"input per tensor: the law's expected output error {per_tensor:.3g} is below "
                            f"{per_channel:.3g} with per-channel scales folded into the weights",)
    return rng, planned, ()


def _bias(lay: _Layer, rng: Range | None, per_channel: bool, w_sim: torch.Tensor):
    """The layer's bias less its expected output error under the input law (bias correction), and
    the mean quantized input that error was computed with (None, None: no bias, no correction)."""
    layer = lay.layer
    if not lay.x.config.bias_correction:
        return (None if layer.bias is None else layer.bias.detach().clone()), None
    mean_x = lay.moments()[0]
    mean_xq = mean_x if rng is None else lay.effect(rng, per_channel).mean_q
    shift = bias_shift(layer, layer.weight.detach(), w_sim, mean_x, mean_xq)
    bias = layer.bias.detach() if layer.bias is not None else w_sim.new_zeros(w_sim.shape[0])
    return bias - shift, mean_xq


def plan_layer(ctx: PlanContext, method, name: str) -> LayerPlan:
    """Layer `name`'s plan by `method` (a layerwise one)."""
    lay = _Layer(ctx, method, name)
    rng = lay.range(lay.x.per_channel)
    rng, (inq, (codes, w_scale, w_sim)), reasons = _choose_fold(lay, rng, lay.weights(rng, lay.x.per_channel))
    per_channel = inq.per_channel
    source = "bn" if name in ctx.propagation.inputs else ctx.fallbacks.get(name, "fallback")
    if source != "bn" and method.range_spec is not None:
        reasons = (f"no law from BatchNorm statistics ({source}): a zero-mean, unit-variance input assumed",
                   *reasons)
    s = lay.s
    bias, input_mean = _bias(lay, rng, per_channel, w_sim)
    return LayerPlan(name, s.method, s.input_bits, s.weight_bits, inq, rng, codes, w_scale, w_sim, bias,
                     inq.mode == "static" and per_channel, source, reasons, input_mean)


def _matmul_quant(ctx: PlanContext, method, site: str, s: LayerSettings) -> InputQuant:
    """One attention matmul operand's quantizer; it follows its block's qkv layer."""
    operand = site.rsplit(".", 1)[1]
    calibrated = {}
    if method.calibration is not None:
        calibrated[site] = method.calibration(s.input_bits, False, ctx.config).measure(ctx.observed[site])
    # the attention map lies in [0, 1] whatever the data
    bounds = Range(torch.tensor(0.0), torch.tensor(1.0)) if operand == "p_in" else None
    rng = method.input_range(LayerInput(site, s.input_bits, False, ctx.config, ctx.matmul_laws.get(site), ctx.memo,
                                        calibrated, bounds))
    return input_quant(rng, s.input_bits, s.input_per_channel if rng is None else False, -1)


def plan_layers(ctx: PlanContext, method) -> MethodPlan:
    """The handler of a layerwise method: each of its layers planned, then its matmul operands."""
    names = ctx.layers_of(method.name)
    layers = {}
    for i, name in enumerate(names):
        if ctx.progress is not None:
            ctx.progress(i / max(len(names), 1), f"quantizing {name}")
        layers[name] = plan_layer(ctx, method, name)
    sites = matmul_sites(ctx.vit) if ctx.vit is not None else {}
    matmuls = {site: _matmul_quant(ctx, method, site, ctx.settings[owner])
               for site, owner in sites.items() if owner in layers}
    return MethodPlan(layers, matmuls)
