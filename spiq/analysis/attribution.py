"""Attribution drift: the same captum attribution on the float and the quantized model.

Rounding has a zero gradient almost everywhere; the fake-quant ops of `qlayers` pass gradients
straight through (STE), so gradient-based attributions of a quantized model are meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from spiq.core.errors import AnalysisError
from spiq.core.devices import module_device
from spiq.core.hooks import forward_hooks
from spiq.graph.ops import GLOBAL_POOL, op_kind
from spiq.graph.trace import is_passthrough, trace
from spiq.quantize.report import QuantResult

METHODS = ("integrated-gradients", "grad-cam")
# Gauss-Legendre steps of Integrated Gradients. On EfficientNet-Lite0 W8A4 (8 sample images) the
# float-vs-quantized rank correlation at 8 steps was within 0.035 of its value at 64 steps, and the
# float map's rank correlation with the 64-step map 0.90-0.96 (0.97-0.99 at 24 steps): the drift
# reads the same at an eighth of the cost. The quantized map converges slowly at any step count
# (0.70-0.88 with its 64-step map, from 8 to 24 steps): its gradients pass rounding straight through.
IG_STEPS = 8


def last_stage(model: nn.Module) -> str:
    """Name of the module whose output the global pooling reads: the last conv stage (for Grad-CAM).

    For a vision transformer: its last block, whose patch tokens are laid out on their grid."""
    from spiq.models.vit import is_transformer

    if is_transformer(model):
        return f"blocks.{len(model.blocks) - 1}"
    gm = trace(model)
    for node in gm.graph.nodes:
        if op_kind(gm, node) == GLOBAL_POOL:
            src: fx.Node = node.args[0]
            while is_passthrough(gm, src):
                src = src.args[0]
            if src.op == "call_module":
                return src.target
    raise AnalysisError(f"{type(model).__name__}: no global pooling found to place Grad-CAM at")


def attribute(model: nn.Module, x: torch.Tensor, target: int, method: str = "integrated-gradients",
              layer: str | None = None, steps: int = IG_STEPS) -> torch.Tensor:
    """An (H, W) attribution map of class `target` for one preprocessed image (3, H, W), computed
    where `model` is, on the CPU."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    x = (x.unsqueeze(0) if x.dim() == 3 else x).detach().to(module_device(model), copy=True).requires_grad_(True)
    if method == "integrated-gradients":
        # chunks of 8: 24 steps in one batch at 224 px held ~3 GB of activations and ran 2-4x slower
        a = IntegratedGradients(model).attribute(x, target=target, n_steps=steps, internal_batch_size=min(steps, 8))
        return a[0].abs().sum(0).detach().cpu()
    if method == "grad-cam":
        from spiq.models.vit import is_transformer

        if is_transformer(model):
            return _token_grad_cam(model, x, target, layer or last_stage(model)).cpu()
        module = model.get_submodule(layer or last_stage(model))
        a = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")[0, 0].detach().cpu()
    raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")


def _token_grad_cam(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    """Grad-CAM on a transformer block's patch tokens: captum's arithmetic, tokens put on their grid.

    captum's LayerGradCam averages gradients over every dimension after the second, which for
    (B, tokens, channels) would average over channels; here the channel weights are the mean
    gradient over the patch tokens, as Grad-CAM means them.
    """
    from torch.nn import functional as F

    from spiq.analysis.layers import token_grid

    seen = {}

    def keep(_mod, _args, y):
        y.retain_grad()
        seen["y"] = y

    with forward_hooks(model, {layer: keep}), torch.enable_grad():
        model(x)[0, target].backward()
    acts, grads = token_grid(seen["y"][0].detach()), token_grid(seen["y"].grad[0])
    cam = torch.relu((grads.mean((1, 2), keepdim=True) * acts).sum(0))
    return F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two maps."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@dataclass
class Drift:
    method: str
    target: int             # the class attributed: the float model's top-1
    float_map: torch.Tensor
    quant_map: torch.Tensor
    difference: torch.Tensor   # quant - float, each normalised to unit max
    rank_correlation: float


def attribution_drift(model: nn.Module, qmodel: QuantResult, x: torch.Tensor,
                      method: str = "integrated-gradients", target: int | None = None) -> Drift:
    """The same attribution on both models, for the float model's top-1 unless `target` is given."""
    if target is None:
        with torch.no_grad():
            target = int(model((x.unsqueeze(0) if x.dim() == 3 else x).to(module_device(model)))[0].argmax())
    # each model's own name for its last stage: an int8_graph twin (an fx GraphModule) keeps only
    # the leaves of a container such as timm's folded BN + act
    fm = attribute(model, x, target, method, last_stage(model) if method == "grad-cam" else None)
    qm = attribute(qmodel.model, x, target, method, last_stage(qmodel.model) if method == "grad-cam" else None)
    norm = lambda m: m / m.abs().max().clamp_min(1e-12)  # noqa: E731
    return Drift(method, target, fm, qm, norm(qm) - norm(fm), rank_correlation(fm, qm))
