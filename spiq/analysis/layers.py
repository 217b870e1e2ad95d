"""Why a quantized model is good or bad, layer by layer, on real images.

Every number here compares a quantized layer with the BN-folded float layer on the very same
float input, so a layer's figure is its own error, not what it inherited from earlier layers.
Each function runs where the quantized model is (the float model where it is), the images moved
there, and returns numbers or CPU tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spiq.core.errors import AnalysisError, UnknownNameError
from spiq.core.devices import module_device, on_device
from spiq.core.hooks import run_with_hooks
from spiq.core.metrics import sqnr_db, tensor_sqnr_db
from spiq.core.quant import Grid, QuantLayer, fake_quant_input, fold_input_scale, quantize_weight
from spiq.models.vit import is_transformer, vit_graph
from spiq.methods.liu_intervals import RankPairs
from spiq.methods.spiq import law_range, law_spec
from spiq.quantize.memo import Memo
from spiq.quantize.report import QuantResult
from spiq.ranges.laws import observe, quantized_samples


def reference_of(model: nn.Module, qmodel: QuantResult) -> nn.Module:
    """The BN-folded float model to compare `qmodel` with: the one quantize() started from, on the
    quantized model's device (a copy there when the shared reference is elsewhere)."""
    return on_device(qmodel.report.reference, module_device(qmodel.model))


def data_free_range(qmodel: QuantResult, layer: str, bits: int, per_channel: bool, memo: Memo | None = None):
    """The range the data-free law gives `layer` at `bits`, by the recipe's rule: searched, or found
    in `memo` (the Memo it was quantized with, where ranges are searched once per model)."""
    report = qmodel.report
    spec, dist = law_spec(bits, per_channel, report.config), report.propagation.inputs[layer]
    return spec.of(dist) if memo is None else law_range(memo.scoped(report.config), layer, dist, spec)


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
def layer_breakdown(model: nn.Module, qmodel: QuantResult, images: torch.Tensor, batch: int = 8) -> list[LayerBreakdown]:
    """Split each quantized layer's error into input clipping, input rounding and the weight side.

    `qmodel` is `quantize(model, config)`. Dynamic layers have no static range: their `clip`
    is +inf and `clipped` 0.
    """
    reference = reference_of(model, qmodel)
    device = module_device(reference)
    names = [n for n, m in qmodel.model.named_modules() if isinstance(m, QuantLayer)]
    energy = {n: [0.0] * 5 for n in names}   # y, clip, input, weight, both
    count = {n: [0, 0] for n in names}

    def hook(name):
        q: QuantLayer = qmodel.model.get_submodule(name)
        rng = qmodel.report.layers[name].range
        if rng is not None:   # the report's range (searched on the CPU) moved once, where the layers run
            shape = ((1, -1, 1, 1) if isinstance(q.layer, nn.Conv2d) else (-1,)) if rng.per_channel else ()
            lo, hi = rng.lo.to(device).view(shape), rng.hi.to(device).view(shape)

        def fn(layer, args, y):
            x = args[0]
            iq = q.input_quant
            if rng is not None:
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

    run_with_hooks(reference, {n: hook(n) for n in names}, images, batch)
    out = []
    for n in names:
        e = energy[n]
        out.append(LayerBreakdown(n, *(sqnr_db(e[0], e[i]) for i in range(1, 5)),
                                  clipped=count[n][0] / max(count[n][1], 1)))
    return out


def _capture(model: nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named layers for one batch (cloned: the activations after them run in place)."""
    out: dict[str, torch.Tensor] = {}
    run_with_hooks(model, {n: (lambda m, a, y, n=n: out.__setitem__(n, y.clone())) for n in names}, x, len(x))
    return out


def _output_energies(reference: nn.Module, qmodel: nn.Module, names: list[str], images: torch.Tensor,
                     batch: int) -> dict[str, list[float]]:
    """Per layer: energy of the float output and of the propagated error (whole model quantized)."""
    acc = {n: [0.0, 0.0] for n in names}
    for i in range(0, len(images), batch):
        ref_out = _capture(reference, names, images[i:i + batch])
        q_out = _capture(qmodel, names, images[i:i + batch])
        for n in names:
            r = ref_out[n].double()
            acc[n][0] += float((r ** 2).sum())
            acc[n][1] += float(((q_out[n].double() - r) ** 2).sum())
    return acc


@dataclass
class LayerSQNR:
    name: str
    isolated: float     # dB: only this layer quantized, on float inputs
    propagated: float   # dB: the whole model quantized, errors of earlier layers included


@torch.no_grad()
def layer_sqnr(model: nn.Module, qmodel: QuantResult, images: torch.Tensor, batch: int = 8,
               breakdown: list[LayerBreakdown] | None = None) -> list[LayerSQNR]:
    """Output SQNR of every quantized layer, isolated and propagated, in network order.

    `breakdown`: `layer_breakdown` of the same images, if already computed (it holds the isolated SQNR).
    """
    iso = {r.name: r.both for r in (breakdown or layer_breakdown(model, qmodel, images, batch))}
    names = list(iso)
    prop = _output_energies(reference_of(model, qmodel), qmodel.model, names, images, batch)
    return [LayerSQNR(n, iso[n], sqnr_db(*prop[n])) for n in names]


@dataclass
class ChannelRanges:
    """The per-tensor vs per-channel picture of one layer's input (all tensors (C,) unless noted)."""
    layer: str
    bits: int
    data_free_lo: torch.Tensor      # the per-channel range the data-free law gives at these bits
    data_free_hi: torch.Tensor
    tensor_lo: float                # the one per-tensor range from the same law
    tensor_hi: float
    observed_lo: torch.Tensor       # what the images produced (float model)
    observed_hi: torch.Tensor
    step: torch.Tensor              # per-channel step size
    tensor_step: float
    effective_bits: torch.Tensor    # log2 of the grid points the observed span covers, per channel grid
    effective_bits_tensor: torch.Tensor   # ... and on the per-tensor grid
    clipped: torch.Tensor           # share of the channel's values outside its per-channel range


@torch.no_grad()
def channel_ranges(model: nn.Module, qmodel: QuantResult, layer: str, images: torch.Tensor,
                   memo: Memo | None = None) -> ChannelRanges:
    """Per-channel vs per-tensor input ranges of `layer` and how the images fill them (`memo`: the
    Memo `qmodel` was quantized with, to find the ranges rather than search them)."""
    report = qmodel.report
    if layer not in report.layers:
        raise UnknownNameError(f"{layer!r} is not a quantized layer of this model")
    bits = report.layers[layer].input_bits
    dist = report.propagation.inputs.get(layer) if report.propagation else None
    if dist is None:
        raise AnalysisError(f"{layer}: no data-free law (its producer could not be analysed)")
    per_c = data_free_range(qmodel, layer, bits, True, memo)
    per_t = data_free_range(qmodel, layer, bits, False, memo)
    obs = observe(reference_of(model, qmodel), [layer], images)[layer]
    levels = Grid.UNSIGNED.levels(bits)[1]
    lo, hi = per_c.lo.to(obs.sample.device), per_c.hi.to(obs.sample.device)   # the law's range, brought to the images
    step = (hi - lo) / levels
    t_step = float((per_t.hi - per_t.lo) / levels)
    span = (obs.hi - obs.lo).clamp_min(0)
    s = obs.sample
    outside = ((s < lo[:, None]) | (s > hi[:, None])).float().mean(1)
    return ChannelRanges(
        layer=layer, bits=bits, data_free_lo=per_c.lo, data_free_hi=per_c.hi,
        tensor_lo=float(per_t.lo), tensor_hi=float(per_t.hi), observed_lo=obs.lo.cpu(), observed_hi=obs.hi.cpu(),
        step=step.cpu(), tensor_step=t_step,
        effective_bits=torch.log2((span / step).clamp_max(levels) + 1).cpu(),
        effective_bits_tensor=torch.log2((span / t_step).clamp_max(levels) + 1).cpu(),
        clipped=outside.cpu())


def channel_spread(qmodel: QuantResult, bits: int = 8, memo: Memo | None = None) -> dict[str, float]:
    """For each layer whose input has a data-free law: how far its channels' ranges differ, as the
    bits a channel's own range saves over one range spanning them all (log2 of the span of all the
    channels' ranges over the channel's, averaged over the live channels). What per-channel input
    ranges buy there, from the BatchNorm statistics alone: no image is read."""
    prop = qmodel.report.propagation
    out = {}
    for name in qmodel.report.layers:
        if prop is None or name not in prop.inputs:
            continue
        rng = data_free_range(qmodel, name, bits, True, memo)
        width, span = rng.hi - rng.lo, float(rng.hi.max() - rng.lo.min())
        live = width > span * 2.0 ** -bits   # a dead channel's range says nothing about the others
        out[name] = float(torch.log2(span / width[live]).mean()) if live.any() else 0.0
    return out


@dataclass
class FoldCost:
    """What folding per-channel input scales into a layer's weights costs, and what it buys (dB)."""
    name: str
    weight_sqnr: float          # weights quantized as they are
    weight_sqnr_folded: float   # weights with the input scales folded in, then quantized
    input_sqnr_tensor: float    # expected input SQNR with one range per tensor (data-free law)
    input_sqnr_channel: float   # ... with one range per channel


@torch.no_grad()
def fold_cost(model: nn.Module, qmodel: QuantResult, memo: Memo | None = None) -> list[FoldCost]:
    """For every layer with folded per-channel input scales: weight error added vs input error removed
    (`memo`: as channel_ranges')."""
    reference = reference_of(model, qmodel)
    report = qmodel.report
    cfg = report.config
    out = []
    for name, lr in report.layers.items():
        q = qmodel.model.get_submodule(name)
        # the input side is measured against the layer's data-free law: a layer ranged without one
        # (an SE block's expand conv reads a pooled vector) has nothing to weigh the fold against
        if not getattr(q, "folded", False) or name not in report.propagation.inputs:
            continue
        w = reference.get_submodule(name).weight
        settings = cfg.for_layer(name)

        def wsqnr(target):
            codes, scale = quantize_weight(target, settings.weight_bits, settings.weight_per_channel,
                                           cfg.weight_clip, cfg.weight_rounding)
            shape = (-1,) + (1,) * (target.dim() - 1) if scale.dim() == 1 else ()
            return sqnr_db(float((target ** 2).sum()), float(((codes * scale.view(shape) - target) ** 2).sum()))

        folded = fold_input_scale(w, q.input_quant.scale, getattr(q.layer, "groups", 1))
        shape = (-1,) + (1,) * (w.dim() - 1) if q.weight_scale.dim() == 1 else ()
        # the folded weights as quantize() left them: their codes are the layer's own
        folded_sqnr = sqnr_db(float((folded ** 2).sum()),
                              float(((q.weight_codes * q.weight_scale.view(shape) - folded) ** 2).sum()))
        dist = report.propagation.inputs[name]

        def isqnr(rng):
            x, p, xq = quantized_samples(dist, rng, lr.input_bits)
            return sqnr_db(float((x ** 2 * p).sum()), float(((xq - x) ** 2 * p).sum()))

        out.append(FoldCost(name, wsqnr(w), folded_sqnr,
                            isqnr(data_free_range(qmodel, name, lr.input_bits, False, memo)),
                            isqnr(data_free_range(qmodel, name, lr.input_bits, True, memo))))
    return out


@dataclass
class Prediction:
    classes: list[str]
    probs: list[float]


@dataclass
class Comparison:
    """Top-k of the float and the quantized model on one image."""
    float: Prediction
    quant: Prediction
    flipped: bool           # top-1 differs
    logit_sqnr: float       # dB


@torch.no_grad()
def compare_predictions(model: nn.Module, qmodel: QuantResult, x: torch.Tensor, classes: list[str],
                        k: int = 5) -> Comparison:
    """`x` is one preprocessed image (3, H, W) or a batch of one, run where each model is."""
    x = x.unsqueeze(0) if x.dim() == 3 else x
    yf, yq = model(x.to(module_device(model)))[0], qmodel(x.to(module_device(qmodel.model)))[0]

    def top(y):
        p = y.softmax(0)
        v, i = p.topk(k)
        return Prediction([classes[j] for j in i.tolist()], v.tolist())

    return Comparison(top(yf), top(yq), int(yf.argmax()) != int(yq.argmax()), tensor_sqnr_db(yf, yq))


def token_grid(y: torch.Tensor) -> torch.Tensor:
    """One sample's output as a (C, h, w) map: a conv's as it is, a ViT layer's patch tokens on their grid."""
    if y.dim() == 3:                                   # (C, H, W)
        return y
    tokens = y.shape[0]                                # (N, C): prefix tokens (class, ...) then h·w patches
    side = math.isqrt(tokens)
    while side > 0 and tokens - side * side > 8:
        side -= 1
    if side == 0:
        raise AnalysisError(f"{tokens} tokens do not hold a square grid of patches")
    return y[tokens - side * side:].t().reshape(y.shape[1], side, side)


def spatial_layers(qmodel: nn.Module) -> list[str]:
    """Quantized layers (of a quantized module) whose outputs have a place in the image: convs, and
    a transformer's token layers."""
    if is_transformer(qmodel):
        return [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer) and n != "head"]
    return [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer) and isinstance(m.layer, nn.Conv2d)]


@torch.no_grad()
def error_maps(model: nn.Module, qmodel: QuantResult, x: torch.Tensor, layers: list[str] | None = None,
               channel: int | None = None) -> dict[str, torch.Tensor]:
    """Spatial maps of |y - ŷ| (mean over channels, or one channel), upsampled to the image size.

    Maps are for conv layers (a transformer's token layers, patch tokens on their grid) with the
    whole model quantized (errors propagated). The "logits" map projects the error of the last
    feature map onto the float top-1 class's classifier row: where in the image the quantized
    model's evidence for that class went wrong. A transformer's classifier reads the class token
    alone, so it has no such map.
    """
    from torch.nn import functional as F

    x = x.unsqueeze(0) if x.dim() == 3 else x
    reference = reference_of(model, qmodel)
    convs = spatial_layers(qmodel.model)
    layers = layers or convs
    unknown = [n for n in layers if n not in convs]
    if unknown:
        raise UnknownNameError(f"not quantized layers with a spatial output: {', '.join(unknown)}")
    last = convs[-1]
    wanted = set(layers) | {last}
    ref_out, q_out = _capture(reference, wanted, x), _capture(qmodel.model, wanted, x)
    top = int(model(x.to(module_device(model)))[0].argmax())
    size = x.shape[-2:]
    maps = {}
    for n in layers:
        diff = token_grid((q_out[n] - ref_out[n]).abs()[0])
        m = diff[channel] if channel is not None else diff.mean(0)
        maps[n] = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].cpu()
    # logit error map: classifier row of the float top-1 applied to the last feature map's error
    head = [m for m in qmodel.model.modules() if isinstance(m, QuantLayer) and isinstance(m.layer, nn.Linear)]
    feat_err = (q_out[last] - ref_out[last])[0]
    if head and feat_err.dim() == 3 and head[-1].layer.in_features == feat_err.shape[0]:
        w = reference.get_submodule(head[-1].name).weight[top]
        m = (w[:, None, None] * feat_err).sum(0).abs()
        maps["logits"] = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].cpu()
    return maps


@dataclass
class AttentionMaps:
    """Where one transformer block looks, float vs quantized, and how its score order held up."""
    block: int
    float_maps: torch.Tensor    # (heads, h, w): the class token's attention to every patch
    quant_maps: torch.Tensor    # ... in the quantized model (the attention map its matmul receives)
    inversions: list[tuple[int, int]]   # per block: (reversed pairs, key pairs compared)
    pairs_per_row: int


@torch.no_grad()
def attention_maps(model: nn.Module, qmodel: QuantResult, x: torch.Tensor, block: int = -1,
                   pairs: int = 64) -> AttentionMaps:
    """Per head attention maps of one block, float vs quantized, and rank inversions of every block.

    An inversion is a pair of keys whose pre-softmax score order the quantized model reverses in
    some query row; `pairs` random key pairs (fixed seed) are compared in every row of every head.
    """
    graph = vit_graph(qmodel.model)
    if graph is None:
        raise AnalysisError("attention maps are for vision transformers; this model has no attention")
    x = x.unsqueeze(0) if x.dim() == 3 else x
    blocks = graph.blocks
    if not -len(blocks) <= block < len(blocks):
        raise AnalysisError(f"the model has blocks 0 to {len(blocks) - 1}; got {block}")
    chosen = blocks[block].attn
    taps = [f"{b.attn}.scores" for b in blocks] + [f"{chosen}.p_in"]
    ref, quant = _capture(reference_of(model, qmodel), taps, x), _capture(qmodel.model, taps, x)
    inv = []
    for b in blocks:
        s_ref, s_q = ref[f"{b.attn}.scores"], quant[f"{b.attn}.scores"]
        inv.append(RankPairs.sample(s_ref.shape[-1], pairs).inversions(s_ref, s_q))

    def maps(p):                                       # (1, H, N, N) -> (H, h, w), class token's row
        row = p[0, :, 0] if getattr(qmodel.model, "cls_token", None) is not None else p[0].mean(1)
        return token_grid(row.t()).cpu().clone()

    return AttentionMaps(block % len(blocks), maps(ref[f"{chosen}.p_in"]), maps(quant[f"{chosen}.p_in"]), inv, pairs)
