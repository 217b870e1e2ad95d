"""BatchNorm folding: conv -> BN becomes one conv with the BN's affine map in its weights and bias."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph import ModelGraph, conv_bn_pairs


@dataclass(frozen=True)
class BNStats:
    """What a folded BN said about its output: per channel mean (beta) and spread (|gamma|)."""
    mean: torch.Tensor
    std: torch.Tensor


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    # timm's BatchNormAct2d runs BN, then drop, then act: only the last two survive the fold.
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if act is None and drop is None:
        return nn.Identity()
    return nn.Sequential(drop or nn.Identity(), act or nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, graph: ModelGraph) -> dict[str, BNStats]:
    """Fold every conv->BN pair of `graph` into `model` in place; return each conv's BN statistics."""
    stats: dict[str, BNStats] = {}
    for conv_name, bn_name in conv_bn_pairs(graph):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * inv.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * inv, requires_grad=False)
        stats[conv_name] = BNStats(mean=bn.bias.detach().clone(), std=bn.weight.detach().abs().clone())
        model.set_submodule(bn_name, _after_bn(bn))
    return stats


def folded_copy(model: nn.Module) -> nn.Module:
    """A BN-folded float copy of `model`: the reference every quantized layer is compared with."""
    import copy

    from .graph import analyse

    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded, analyse(folded))
    return folded
