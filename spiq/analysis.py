"""Why a quantized model is good or bad, layer by layer, on real images.

Every number here compares a quantized layer with the BN-folded float layer on the very same
float input, so a layer's figure is its own error, not what it inherited from earlier layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .fold import folded_copy
from .qlayers import QuantLayer, fake_quant_input


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """20·log10(‖y‖/‖y − ŷ‖) from the two squared norms."""
    if noise_energy <= 0:
        return math.inf
    if signal_energy <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


@dataclass
class LayerBreakdown:
    """Output SQNR (dB) of one layer with one source of error at a time, isolated on float inputs."""
    name: str
    clip: float       # input clamped to its static range, nothing rounded
    input: float      # input quantized (clipping and rounding), float weights
    weight: float     # the quantized (for SPIQ: scale-folded) weights and corrected bias, float input
    both: float       # the quantized layer as it runs
    clipped: float    # share of input values outside the static range


@torch.no_grad()
def layer_breakdown(model: nn.Module, qmodel: nn.Module, images: torch.Tensor, batch: int = 8) -> list[LayerBreakdown]:
    """Split each quantized layer's error into input clipping, input rounding and the weight side.

    `qmodel` is `quantize(model, config)`. Dynamic layers have no static range: their `clip`
    is +inf and `clipped` 0.
    """
    reference = folded_copy(model)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    energy = {n: torch.zeros(5, dtype=torch.float64) for n in names}   # y, clip, input, weight, both
    count = {n: [0, 0] for n in names}

    def hook(name):
        q: QuantLayer = qmodel.get_submodule(name)

        def fn(layer, args, y):
            x = args[0]
            iq = q.input_quant
            rng = qmodel.spiq_report.layers[name].range
            if rng is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2) if rng.per_channel else ()
                lo, hi = rng.lo.view(shape), rng.hi.view(shape)
                x_clip = torch.minimum(torch.maximum(x, lo), hi)
                count[name][0] += int((x_clip != x).sum())
            else:
                x_clip = x
            count[name][1] += x.numel()
            # .forward, not __call__: calling the hooked layer would re-enter this hook
            outs = [layer.forward(x_clip), layer.forward(fake_quant_input(x, iq)) if iq else y, q.layer(x), q(x)]
            energy[name][0] += float((y.double() ** 2).sum())
            for i, o in enumerate(outs, 1):
                energy[name][i] += float(((o.double() - y.double()) ** 2).sum())
        return fn

    handles = [reference.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(images), batch):
            reference(images[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    out = []
    for n in names:
        e = energy[n].tolist()
        out.append(LayerBreakdown(n, *(sqnr_db(e[0], e[i]) for i in range(1, 5)),
                                  clipped=count[n][0] / max(count[n][1], 1)))
    return out
