"""The bias fit: each activated layer's bias shifted, in order, until the per-channel mean of its
activated output matches the float model's on images distilled from the BatchNorm statistics."""
from __future__ import annotations

import torch
from torch import nn

from spiq.config import AUTO_BIAS_IMAGES, QuantConfig
from spiq.core.hooks import run_with_hooks
from spiq.graph.trace import ModelGraph, is_passthrough
from spiq.models.vit import VitGraph
from spiq.quantize.distill import has_batchnorm
from spiq.graph.ops import ACTIVATIONS


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
