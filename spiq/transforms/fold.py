"""Exact rewrites of the float model before quantization: BatchNorm folding (conv -> BN becomes one
conv) and cross-layer equalization (two layers joined by a ReLU trade a per-channel factor)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from spiq.core.tensors import broadcast_input, per_input_channel
from spiq.graph.ops import RELUS, ChannelReLU6
from spiq.graph.trace import ModelGraph, conv_bn_pairs, is_passthrough


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

    from spiq.graph.trace import analyse

    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded, analyse(folded))
    return folded


# --- cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019) ------------------

@dataclass(frozen=True)
class EqualizedPair:
    producer: str
    acts: tuple[str, ...]    # the ReLU/ReLU6 modules between the two
    consumer: str


def equalization_pairs(graph: ModelGraph) -> list[EqualizedPair]:
    """Layers whose output reaches exactly one other layer through nothing but ReLU/ReLU6 (and
    pass-throughs): scaling one's output channels and the other's input channels is then exact."""
    gm = graph.gm
    layer_of = {layer.node: name for name, layer in graph.layers.items()}
    pairs = []
    for name, layer in graph.layers.items():
        node, acts = layer.input, []
        while isinstance(node, fx.Node) and node not in layer_of and len(node.users) == 1:
            mod = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(mod, RELUS):   # f(x / s) = f(x) / s, caps divided along
                acts.append(node.target)
            elif not is_passthrough(gm, node):
                break
            node = node.args[0] if node.args else None
        if node not in layer_of or len(node.users) != 1:
            continue
        consumer = layer.module
        c_in = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
        if gm.get_submodule(node.target).weight.shape[0] == c_in:
            pairs.append(EqualizedPair(layer_of[node], tuple(reversed(acts)), name))
    return pairs


@torch.no_grad()
def equalize(model: nn.Module, graph: ModelGraph, bn_stats: dict[str, BNStats], rounds: int = 50,
             tol: float = 1e-4) -> list[EqualizedPair]:
    """Cross-layer equalization of every pair in `graph`, in place on the BN-folded `model`.

    Channel c of the producer is divided by s_c and the consumer's input channel c multiplied by it,
    s_c = sqrt(r1_c / r2_c) with r1 the producer's row range and r2 the consumer's column range, so
    that both become sqrt(r1·r2): weights quantized per tensor and activations quantized per
    tensor then lose less to channels far narrower than the widest. A layer in two pairs (a
    depthwise conv between two pointwise ones) moves with both, so the pairs are swept until the
    factors settle. ReLU6 caps follow their channels (ChannelReLU6); the BN statistics of the
    producer are divided too, so the data-free laws describe the equalized tensors.
    """
    pairs = equalization_pairs(graph)
    for _ in range(rounds):
        moved = 0.0
        for pair in pairs:
            p, c = model.get_submodule(pair.producer), model.get_submodule(pair.consumer)
            groups = getattr(c, "groups", 1)
            r1, r2 = p.weight.abs().flatten(1).amax(1), per_input_channel(c.weight.abs(), groups, "amax")
            s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1))
            p.weight.div_(s.view(-1, *([1] * (p.weight.dim() - 1))))
            if p.bias is not None:
                p.bias.div_(s)
            c.weight.mul_(broadcast_input(s, c.weight, groups))
            for act in pair.acts:
                mod = model.get_submodule(act)
                if isinstance(mod, nn.ReLU6):
                    model.set_submodule(act, ChannelReLU6(torch.full_like(s, 6.0) / s))
                elif isinstance(mod, ChannelReLU6):
                    mod.cap.div_(s)
            if pair.producer in bn_stats:
                st = bn_stats[pair.producer]
                bn_stats[pair.producer] = BNStats(st.mean / s, st.std / s)
            moved = max(moved, float(s.log().abs().max()))
        if moved < tol:
            break
    return pairs
