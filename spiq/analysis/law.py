"""Law versus reality: the input law SPIQ predicted for one channel of a layer from the BatchNorm
statistics, next to the values that channel takes on real images.

The law shown is the `Dist` object quantize() searched the layer's ranges on (the report's
propagation), and the ranges are the ones its memo holds: nothing here re-derives them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spiq.core.errors import AnalysisError, UnknownNameError
from spiq.analysis.layers import data_free_range, reference_of
from spiq.core.hooks import run_with_hooks
from spiq.core.tensors import Range
from spiq.quantize.memo import Memo
from spiq.quantize.report import QuantResult
from spiq.ranges.laws import Dist


@dataclass
class LawVsReality:
    """One layer input's predicted law and what real images put there (tensors (C,) unless noted)."""
    layer: str
    channel: int
    bits: int                         # the layer's input bits in the recipe: the ranges are chosen for them
    law: Dist                         # the layer input's law, the very object quantize() searched its ranges on
    law_x: torch.Tensor               # (K,) the channel's law as weighted samples (quantiles of it) ...
    law_w: torch.Tensor               # (K,) ... and their probabilities
    observed: torch.Tensor            # (N,) the channel's input values on the images (float model)
    spiq_range: tuple[float, float]   # the channel's data-free per-channel range at `bits` (SPIQ's)
    tensor_range: tuple[float, float]   # the layer's data-free per-tensor range at `bits` (static-tensor's)
    applied: Range | None             # the range the recipe's layer uses (report), None if dynamic or skipped
    clipped_spiq: float               # share of the channel's observed values outside spiq_range
    clipped_tensor: float             # ... outside tensor_range
    clipped_spiq_all: torch.Tensor    # every channel's share outside its own SPIQ range
    predicted_std: torch.Tensor       # the law's standard deviation, every channel
    observed_std: torch.Tensor        # the images' standard deviation, every channel
    predicted_mean: torch.Tensor
    observed_mean: torch.Tensor


def _input_values(reference: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """(C, N): every value each input channel of `layer` takes on `images`, in the float model."""
    seen = []

    def hook(mod, args):
        x = args[0].detach()
        if isinstance(mod, nn.Linear) or x.dim() == 2:   # channels last: tokens (..., C)
            seen.append(x.reshape(-1, x.shape[-1]).t())
        else:
            seen.append(x.transpose(0, 1).reshape(x.shape[1], -1))

    run_with_hooks(reference, {layer: hook}, images, batch=len(images), pre=True)
    return torch.cat(seen, 1).float()


def law_of(qmodel: QuantResult, layer: str) -> Dist:
    """The data-free law quantize() chose `layer`'s input ranges from; ValueError where there is none
    from BatchNorm statistics (the image itself, an input the analysis could not follow)."""
    report = qmodel.report
    prop = report.propagation
    if prop is None or layer not in prop.inputs:
        if prop is not None and layer not in prop.fallbacks:
            raise UnknownNameError(f"{layer!r} is not a quantizable layer of this model")
        reason = prop.fallbacks[layer] if prop is not None else "no graph analysis"
        raise AnalysisError(f"{layer}: no data-free law to compare with ({reason})")
    law = prop.inputs[layer]
    if law.use_bounds:
        raise AnalysisError(f"{layer} reads the normalised image: its range is the input's bounds, not a law "
                         f"predicted from BatchNorm statistics")
    return law


def _outside(values: torch.Tensor, lo, hi) -> torch.Tensor:
    return ((values < lo) | (values > hi)).float().mean(-1)


@torch.no_grad()
def law_vs_reality(qmodel: QuantResult, images: torch.Tensor, layer: str, channel: int | None = None,
                   memo: Memo | None = None) -> LawVsReality:
    """`layer`'s input law for one `channel` against its values on `images` (N, 3, H, W), with SPIQ's
    per-channel range and the per-tensor range at the recipe's input bits, and every channel's
    predicted against observed spread. `channel` None: the channel SPIQ's range clips most on
    these images (where none is clipped, the one with the widest range). `memo`: the Memo `qmodel`
    was quantized with, to find the ranges rather than search them."""
    report = qmodel.report
    law = law_of(qmodel, layer)
    bits = report.config.for_layer(layer).input_bits
    per_c = data_free_range(qmodel, layer, bits, True, memo)
    per_t = data_free_range(qmodel, layer, bits, False, memo)
    # the images run where the quantized model is; the law and its ranges stay on the CPU
    values = _input_values(reference_of(qmodel.model, qmodel), layer, images)
    clipped = _outside(values, per_c.lo.to(values.device)[:, None], per_c.hi.to(values.device)[:, None]).cpu()
    if channel is None:
        widest = int((per_c.hi - per_c.lo).argmax())
        channel = int(clipped.argmax()) if float(clipped.max()) > 0 else widest
    if not 0 <= channel < law.channels:
        raise AnalysisError(f"{layer} has input channels 0 to {law.channels - 1}; got {channel}")
    x, w = law.samples()
    mean, std = law.moments()
    applied = report.layers[layer].range if layer in report.layers else None
    return LawVsReality(
        layer=layer, channel=channel, bits=bits, law=law, law_x=x[channel], law_w=w, observed=values[channel].cpu(),
        spiq_range=(float(per_c.lo[channel]), float(per_c.hi[channel])),
        tensor_range=(float(per_t.lo), float(per_t.hi)), applied=applied,
        clipped_spiq=float(clipped[channel]),
        clipped_tensor=float(_outside(values[channel], per_t.lo.to(values.device), per_t.hi.to(values.device))),
        clipped_spiq_all=clipped, predicted_std=std, observed_std=values.std(1, correction=0).cpu(),
        predicted_mean=mean, observed_mean=values.mean(1).cpu())


def histogram_edges(lv: LawVsReality, bins: int = 60) -> np.ndarray:
    """Bins over the channel's observed values and SPIQ's range for it: where the two are compared."""
    values = lv.observed.double().numpy()
    lo = min(float(values.min()), lv.spiq_range[0])
    hi = max(float(values.max()), lv.spiq_range[1])
    if hi - lo < 1e-6:   # a constant channel
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def law_counts(lv: LawVsReality, edges: np.ndarray) -> np.ndarray:
    """How many of the channel's observed values the law expects in each bin between `edges`:
    its probability there (from its weighted samples, point masses such as ReLU's zeros included)
    times the number of values. What a histogram of the values should look like if the law held."""
    x, w = lv.law_x.double().numpy(), lv.law_w.double().numpy()
    order = np.argsort(x, kind="stable")
    cdf = np.concatenate([[0.0], np.cumsum(w[order])])
    xs, edges = x[order], np.asarray(edges, dtype=np.float64)
    # the bins of np.histogram: [e_i, e_i+1), the last one closed
    below = cdf[np.searchsorted(xs, edges, side="left")]
    below[-1] = cdf[np.searchsorted(xs, edges[-1], side="right")]
    return np.diff(below) * lv.observed.numel()
