"""Data-free laws of a vision transformer's quantizer inputs.

The data-free laws follow SPIQ's idea with LayerNorm in BatchNorm's place: a LayerNorm output is
roughly unit-variance per token before its affine map, so channel c spans about β_c ± k·|γ_c|.
Linears fed by another linear (the attention output projection, the second MLP layer) get the law
carried through the weights, channels taken as independent.
"""
from __future__ import annotations

import torch
from torch import nn

from spiq.models.vit import VitGraph
from spiq.ranges.laws import Dist, Propagation, image_dist, moment_layer

_GELU_MIN = -0.17   # GELU's minimum: the floor of an MLP hidden activation


def layernorm_dist(ln: nn.LayerNorm, tail: str) -> Dist:
    """LayerNorm output per channel: β_c + |γ_c|·Z, Z the normalised token (unit variance)."""
    c = ln.normalized_shape[0]
    gamma = ln.weight.detach() if ln.weight is not None else torch.ones(c)
    beta = ln.bias.detach() if ln.bias is not None else torch.zeros(c)
    inf = torch.full((c,), float("inf"))
    return Dist(beta.clone(), gamma.abs().clone(), -inf, inf, tail=tail)


def _linear_dist(layer: nn.Linear, d_in: Dist, tail: str, rows: slice = slice(None), gain: float = 1.0,
                 act: nn.Module | None = None) -> Dist:
    mean, std = moment_layer(layer, d_in)
    mean, std = mean[rows] * gain, std[rows] * gain
    inf = torch.full_like(mean, float("inf"))
    if act is None:
        return Dist(mean, std, -inf, inf, tail=tail)
    return Dist(mean, std, torch.full_like(mean, _GELU_MIN), inf, (act,), tail=tail)


@torch.no_grad()
def vit_laws(model: nn.Module, graph: VitGraph, input_lo: torch.Tensor, input_hi: torch.Tensor,
             tail: str) -> tuple[Propagation, dict[str, Dist]]:
    """Data-free laws of every linear input and of every matmul operand but the attention map."""
    prop = Propagation()
    matmuls: dict[str, Dist] = {}
    prop.inputs[graph.patch] = image_dist(input_lo, input_hi, tail)
    for b in graph.blocks:
        attn = model.get_submodule(b.attn)
        dim = attn.num_heads * attn.head_dim
        d1 = layernorm_dist(model.get_submodule(b.norm1), tail)
        prop.inputs[b.qkv] = d1
        qkv = model.get_submodule(b.qkv)
        matmuls[f"{b.attn}.q_in"] = _linear_dist(qkv, d1, tail, slice(0, dim), attn.scale)
        matmuls[f"{b.attn}.k_in"] = _linear_dist(qkv, d1, tail, slice(dim, 2 * dim))
        v = _linear_dist(qkv, d1, tail, slice(2 * dim, 3 * dim))
        matmuls[f"{b.attn}.v_in"] = v
        # The attention output mixes v's rows with convex weights: never wider than v itself.
        prop.inputs[b.proj] = v
        d2 = layernorm_dist(model.get_submodule(b.norm2), tail)
        prop.inputs[b.fc1] = d2
        prop.inputs[b.fc2] = _linear_dist(model.get_submodule(b.fc1), d2, tail, act=nn.GELU())
    if graph.head is not None:
        if graph.head_norm is not None:
            prop.inputs[graph.head] = layernorm_dist(model.get_submodule(graph.head_norm), tail)
        else:
            prop.fallbacks[graph.head] = "pooled tokens without a LayerNorm before the head"
    return prop, matmuls
