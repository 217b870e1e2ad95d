"""Quantized layers: the arithmetic of fake quantization and the module that wraps a conv/linear.

Every quantizer is uniform and affine. Inputs are unsigned codes in [0, 2^b - 1] with a zero
point, weights are symmetric signed codes in [-(2^(b-1) - 1), 2^(b-1) - 1]. When gradients flow,
input quantizers use PyTorch's fused kernels, whose backward is the straight-through estimator,
so gradient-based attributions stay meaningful on a quantized model; without gradients the same
arithmetic runs in place, faster.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F

from spiq.core.tensors import Range, broadcast_input


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | float, qmin: int,
               qmax: int, arithmetic: str = "torch") -> torch.Tensor:
    """The one uniform affine fake quantization: (clamp(round(x / scale) + zero, qmin, qmax) − zero) · scale,
    `scale` and `zero` broadcast against x, the gradient passed straight through.

    Runtimes round differently at the last bit, and a simulation matches one of them exactly:
    "torch", x · (1/scale), torch's fused fake-quant kernels; "divide", x / scale, ONNX's
    QuantizeLinear with an integer zero (and the data-free laws' samples, which the ranges are
    searched with); "graph", round(x / scale + zero), the int8 graph's grids whose per-channel
    zero can be fractional."""
    if arithmetic == "graph":
        q = torch.round(x / scale + zero)
    else:
        q = torch.round(x / scale if arithmetic == "divide" else x * (1.0 / scale)).add_(zero)
    q = q.clamp_(qmin, qmax).sub_(zero).mul_(scale)
    return x + (q - x).detach() if torch.is_grad_enabled() and x.requires_grad else q


class Grid(str, Enum):
    """The integer codes a quantizer rounds to, and the one place their bounds are computed."""
    WEIGHT = "weight"       # symmetric signed: -(2^(b-1) - 1) .. 2^(b-1) - 1 (no code without a negation)
    SIGNED = "signed"       # -2^(b-1) .. 2^(b-1) - 1
    UNSIGNED = "unsigned"   # 0 .. 2^b - 1, inputs with a zero point

    def levels(self, bits: int) -> tuple[int, int]:
        """(qmin, qmax) of a `bits`-bit grid."""
        if self is Grid.UNSIGNED:
            return 0, 2 ** bits - 1
        half = 2 ** (bits - 1)
        return (-(half - 1) if self is Grid.WEIGHT else -half), half - 1


def input_scale_zero(rng: Range, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the grid covering [lo, hi] with 2^bits codes."""
    qmin, qmax = Grid.UNSIGNED.levels(bits)
    scale = ((rng.hi - rng.lo) / qmax).float().clamp_min(1e-12)
    zero = torch.round(-rng.lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def _flip_largest(e: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row of e (R, J), -1/+1 on the |count| entries whose rounding error e points the way of count."""
    flips = torch.zeros_like(e)
    rows = count != 0
    if not bool(rows.any()):  # e.g. every 1x1 kernel: one tap never rounds by more than half a step
        return flips
    # only the rows that flip anything, and only as deep as the deepest of them flips: a partial
    # sort (topk) of a few dozen of a row's thousand entries is what makes re-quantizing fast
    er, cr = e[rows], count[rows]
    sign = torch.sign(cr).unsqueeze(-1)
    n = cr.abs().unsqueeze(-1)
    k = int(n.max())
    top = torch.topk(er * sign, k, dim=-1).indices
    chosen = torch.zeros_like(er).scatter_(-1, top, (torch.arange(k, device=e.device) < n).to(er.dtype))
    flips[rows] = -chosen * sign
    return flips


def squant_round(x: torch.Tensor, n: int) -> torch.Tensor:
    """SQuant's data-free rounding (Guo et al., ICLR 2022) of x = w / scale, shaped (O, C, J).

    Rounding to nearest leaves each kernel's and each output channel's rounding errors to add up;
    SQuant flips the roundings with the largest errors until every kernel (the J taps of one
    input channel) and then every output channel sums to within half a step, which bounds the
    error a constant input would see. Codes stay within [-n, n].
    """
    q = torch.round(x)
    e = q - x                                                     # each in [-0.5, 0.5]
    # kernel level: within each (o, c), flip round(sum e) taps
    flips = _flip_largest(e, torch.round(e.sum(-1)))
    q = torch.clamp(q + flips, -n, n)
    e = q - x
    # channel level: within each o, flip one tap in each of the round(sum e) kernels that lean most
    k_err = e.sum(-1)                                            # (O, C)
    k_flip = _flip_largest(k_err, torch.round(k_err.sum(-1)))  # (O, C): which kernels, which way
    tap = torch.where(k_flip.unsqueeze(-1) < 0, e, -e).argmax(-1, keepdim=True)  # the tap leaning most
    q = torch.clamp(q.scatter_add(-1, tap, k_flip.unsqueeze(-1)), -n, n)
    return q


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool, clip: str = "max",
                    rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight quantization: integer codes and the scale per output channel (or tensor)."""
    n = Grid.WEIGHT.levels(bits)[1]
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    amax = flat.abs().max(1).values.clamp_min(1e-12)
    if clip == "mse":
        # Per-channel search of the clipping ratio minimising ||w - q(w)||^2: coarse, then fine.
        best = torch.ones_like(amax)
        for lo, hi in ((0.2, 1.0), (-0.03, 0.03)):
            ratios = torch.linspace(lo, hi, 17, device=w.device)
            cand = (ratios[None, :] + (best[:, None] if lo < 0 else torch.zeros_like(best)[:, None])).clamp(0.05, 1.0)
            s = (amax[:, None] * cand / n)[:, :, None]
            err = ((torch.clamp(torch.round(flat[:, None, :] / s), -n, n) * s - flat[:, None, :]) ** 2).sum(-1)
            best = cand.gather(1, err.argmin(1, keepdim=True))[:, 0]
        amax = amax * best
    elif clip != "max":
        raise ValueError(f"unknown weight clipping {clip!r}")
    scale = amax / n
    if rounding == "squant":
        scaled = (w / _per_out(scale if per_channel else scale[0], w))
        scaled = scaled.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else scaled.reshape(w.shape[0], 1, -1)
        codes = squant_round(torch.clamp(scaled, -n, n), n).reshape(w.shape)
    elif rounding == "nearest":
        codes = torch.clamp(torch.round(flat / scale[:, None]), -n, n).reshape(w.shape)
    else:
        raise ValueError(f"unknown weight rounding {rounding!r}")
    return codes, scale if per_channel else scale[0]


def _per_out(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return scale.view((-1,) + (1,) * (w.dim() - 1)) if scale.dim() == 1 else scale


def fold_input_scale(w: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W[:, c] * s_c for a linear (O, C) or a (grouped) conv (O, C/groups, kh, kw)."""
    return w * broadcast_input(s, w, groups)


@dataclass(frozen=True)
class InputQuant:
    """How a layer's input is quantized. mode: 'static' (range fixed) or 'dynamic' (per sample)."""
    mode: str
    bits: int
    per_channel: bool
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    # Where the channels are: 1 for a conv's (N, C, H, W), -1 (last) for a linear's (..., C) tokens.
    axis: int = 1


def moved_input_quant(q: InputQuant | None, fn) -> InputQuant | None:
    """`q` with its scale and zero passed through a Module._apply function (a .to(device), .double())."""
    if q is None or q.scale is None:
        return q
    return replace(q, scale=fn(q.scale), zero=fn(q.zero))


def channel_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def fake_quant_input(x: torch.Tensor, q: InputQuant) -> torch.Tensor:
    qmax = Grid.UNSIGNED.levels(q.bits)[1]
    axis = q.axis % x.dim()
    if q.mode == "static":
        if torch.is_grad_enabled() and x.requires_grad:   # the fused kernels carry the straight-through gradient
            if q.per_channel:
                return torch.fake_quantize_per_channel_affine(x, q.scale, q.zero, axis, 0, qmax)
            return torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero, 0, qmax)
        # Without gradients, the same arithmetic as those kernels (round(x · (1/s)) + z, clamp, back),
        # bit for bit, in a few vectorised passes: 2-4x faster than kernels that also build a mask.
        shape = [1] * x.dim()
        if q.per_channel:
            shape[axis] = -1
        return fake_quant(x, q.scale.view(shape), q.zero.to(x.dtype).view(shape), 0, qmax)
    # dynamic: each sample's own min/max, per tensor or per channel
    dims = tuple(d for d in range(1, x.dim()) if not (q.per_channel and d == axis))
    lo = x.amin(dim=dims, keepdim=True).clamp_max(0)
    hi = x.amax(dim=dims, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    return fake_quant(x, scale, torch.round(-lo / scale), 0, qmax, arithmetic="divide")


class GridQuant(nn.Module):
    """Fake quantization of a tensor on a fixed per-channel grid, x ≈ (code − zero)·step with codes
    0..qmax, gradients passed straight through: a quantizer the int8 graph has where SPIQ's
    simulation has none (a residual branch before its add, the add's output, a pooled tensor)."""
    fx_leaf = True   # traced whole; graph.ops lets a producer search walk through it

    def __init__(self, step: torch.Tensor, zero: torch.Tensor, qmax: int = Grid.UNSIGNED.levels(8)[1]):
        super().__init__()
        self.qmax = qmax
        self.register_buffer("step", step.float())
        self.register_buffer("zero", zero.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return fake_quant(x, self.step.view(shape), self.zero.view(shape), 0, self.qmax, arithmetic="graph")


class QuantLayer(nn.Module):
    """A conv/linear whose input is fake-quantized and whose weights sit on an integer grid.

    With a static per-channel input, the input scales are folded into the weights before they are
    quantized per output channel (SPIQ): `weight_codes * weight_scale` are the integer weights the
    layer would run with on integer input codes, and `layer.weight` holds the same product divided
    back by the input scales so that the float simulation can take fake-quantized inputs.
    """
    fx_leaf = True   # traced whole: its quantizer branches on whether gradients flow

    def __init__(self, layer: nn.Module, input_quant: InputQuant | None, weight_codes: torch.Tensor,
                 weight_scale: torch.Tensor, folded: bool, name: str = ""):
        super().__init__()
        self.layer = layer
        self.input_quant = input_quant
        self.folded = folded
        self.name = name
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("weight_scale", weight_scale)

    def _apply(self, fn, *args, **kwargs):
        # the quantizer's scale and zero are not buffers (a frozen dataclass holds them): without
        # this, model.to("cuda") would leave them on the CPU
        self.input_quant = moved_input_quant(self.input_quant, fn)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if self.input_quant is not None:
            x = fake_quant_input(x, self.input_quant)
        return self.layer(x)

    def integer_accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on integer codes: the exact int64 accumulator and the scale that dequantizes it."""
        q = self.input_quant
        if q is None or q.mode != "static":
            raise ValueError("integer arithmetic needs a static input quantizer")
        # Codes from the very kernel the simulation uses: at ties (normalised 8-bit pixels sit
        # exactly on half-steps) any other rounding expression may land on the other side.
        conv = isinstance(self.layer, nn.Conv2d)
        shape = ((1, -1, 1, 1) if conv else (-1,)) if q.per_channel else ()
        codes = torch.round(fake_quant_input(x, q) / q.scale.view(shape)).double()
        w = self.weight_codes.double()
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            padding = layer.padding
            if type(layer).__name__ == "Conv2dSame":  # timm's TF "same" padding, computed per input size
                from timm.layers.padding import pad_same

                codes, padding = pad_same(codes, layer.kernel_size, layer.stride, layer.dilation), 0
            acc = F.conv2d(codes, w, None, layer.stride, padding, layer.dilation, layer.groups)
        else:
            acc = F.linear(codes, w)
        # float64 holds these integer sums exactly (|acc| < 2^53)
        acc = acc.round().to(torch.int64)
        shape = (1, -1, 1, 1) if conv else (-1,)
        scale = self.weight_scale.double().view(shape) if self.weight_scale.dim() == 1 else self.weight_scale.double()
        if not self.folded:  # a per-tensor input scale multiplies the result instead
            scale = scale * q.scale.double()
        return acc, scale

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer computed on integers, then rescaled and biased."""
        acc, scale = self.integer_accumulator(x)
        y = acc.double() * scale
        if self.layer.bias is not None:
            y = y + self.layer.bias.double().view((1, -1, 1, 1) if isinstance(self.layer, nn.Conv2d) else (-1,))
        return y.float()

    def extra_repr(self) -> str:
        q = self.input_quant
        w_bits = int(self.weight_codes.abs().max().item()).bit_length() + 1
        if q is None:
            return f"input=float, weight~{w_bits}b"
        return (f"input={q.mode}/{'channel' if q.per_channel else 'tensor'}/{q.bits}b, "
                f"folded={self.folded}")


class ActQuant(nn.Module):
    """Fake quantization of an activation that feeds no weight (an attention matmul's operand).

    With no quantizer it is the identity, so a float model can carry it as an observation point."""

    def __init__(self, quant: InputQuant | None = None):
        super().__init__()
        self.quant = quant

    def _apply(self, fn, *args, **kwargs):
        self.quant = moved_input_quant(self.quant, fn)   # as QuantLayer's
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        return x if self.quant is None else fake_quant_input(x, self.quant)

    def extra_repr(self) -> str:
        q = self.quant
        return "float" if q is None else f"{q.mode}/{'channel' if q.per_channel else 'tensor'}/{q.bits}b"


def make_weights(layer: nn.Module, bits: int, per_channel: bool, clip: str,
                 input_scale: torch.Tensor | None, rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `layer`'s weights, first folding per-channel input scales in when given.

    Returns (codes, scale, float weight for the simulation)."""
    w = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    target = fold_input_scale(w, input_scale, groups) if input_scale is not None else w
    codes, scale = quantize_weight(target, bits, per_channel, clip, rounding)
    wq = codes * _per_out(scale, codes)
    if input_scale is not None:
        wq = fold_input_scale(wq, 1.0 / input_scale, groups)
    return codes, scale, wq
