"""Vision transformers: where their quantizers sit and what their inputs look like without data.

One transformer form is handled: timm's `VisionTransformer` (DeiT, ViT; the registry converts
torchvision's ViT into it). Its attention runs through `F.scaled_dot_product_attention`, which
hides both matmuls, so `tap_attention` rebuilds every attention module as `TapAttention`: the same
arithmetic with the softmax written out and an `ActQuant` in front of each matmul operand. A float
model carrying TapAttention is the reference every quantized transformer is compared with, and its
taps are where hooks observe scores and attention maps.

The data-free laws follow SPIQ's idea with LayerNorm in BatchNorm's place: a LayerNorm output is
roughly unit-variance per token before its affine map, so channel c spans about β_c ± k·|γ_c|.
Linears fed by another linear (the attention output projection, the second MLP layer) get the law
carried through the weights, channels taken as independent.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .qlayers import ActQuant
from .ranges import Dist, Propagation, _moment_layer, image_dist

# The operands of the two attention matmuls, as TapAttention names them.
MATMUL_SITES = ("q_in", "k_in", "p_in", "v_in")
_GELU_MIN = -0.17


class TransformerError(ValueError):
    """A transformer whose structure the quantizer does not know."""


class TapAttention(nn.Module):
    """timm's Attention with the matmuls written out and their operands quantizable.

    softmax(q·kᵀ)·v with q scaled by 1/√d before its quantizer, so the scale is part of q's grid.
    `scores` is an identity tap on the pre-softmax scores (for rank inversions), `p_in` sees the
    attention map itself.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_in, self.k_in, self.p_in, self.v_in = ActQuant(), ActQuant(), ActQuant(), ActQuant()
        self.scores = nn.Identity()

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The qkv layer's output (B, N, 3·D) as q, k, v, each (B, heads, N, head_dim)."""
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("masked attention is not part of an image classifier")
        b, n, _ = x.shape
        q, k, v = self.heads(self.qkv(x))
        scores = self.scores(self.q_in(q * self.scale) @ self.k_in(k).transpose(-2, -1))
        out = self.p_in(scores.softmax(-1)) @ self.v_in(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


@dataclass(frozen=True)
class BlockNames:
    """Module names of one transformer block."""
    norm1: str
    attn: str
    qkv: str
    proj: str
    norm2: str
    fc1: str
    fc2: str

    @property
    def mlp(self) -> str:
        return self.fc1.rsplit(".", 1)[0]

    @property
    def attention_layers(self) -> tuple[str, str]:
        return self.qkv, self.proj

    @property
    def mlp_layers(self) -> tuple[str, str]:
        return self.fc1, self.fc2


@dataclass(frozen=True)
class VitGraph:
    """Who feeds whom in a ViT: the patch embedding, the blocks, the head and the norm before it."""
    patch: str
    blocks: tuple[BlockNames, ...]
    head: str | None
    head_norm: str | None


def _vit_class():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return VisionTransformer


def is_transformer(model: nn.Module) -> bool:
    cls = _vit_class()
    return cls is not None and isinstance(model, cls)


def vit_graph(model: nn.Module) -> VitGraph | None:
    """The ViT's structure, or None when `model` is not a transformer; raise on unknown variants."""
    if not is_transformer(model):
        return None
    from timm.models.vision_transformer import Attention

    blocks = []
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        attn = blk.attn
        if not isinstance(attn, (Attention, TapAttention)):
            raise TransformerError(f"{p}.attn is a {type(attn).__name__}; only timm's Attention is supported")
        if isinstance(attn, Attention) and (not isinstance(attn.q_norm, nn.Identity) or attn.gate is not None
                                            or not isinstance(attn.norm, nn.Identity)):
            raise TransformerError(f"{p}.attn uses q/k norm, a gate or a scale norm, which the quantizer does not model")
        for part in ("norm1", "norm2"):
            if not isinstance(getattr(blk, part), nn.LayerNorm):
                raise TransformerError(f"{p}.{part} is a {type(getattr(blk, part)).__name__}, not a LayerNorm")
        if not (hasattr(blk.mlp, "fc1") and hasattr(blk.mlp, "fc2")) or not isinstance(blk.mlp.act, nn.GELU):
            raise TransformerError(f"{p}.mlp is not a fc1 → GELU → fc2 MLP")
        blocks.append(BlockNames(f"{p}.norm1", f"{p}.attn", f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.norm2",
                                 f"{p}.mlp.fc1", f"{p}.mlp.fc2"))
    head = "head" if isinstance(model.head, nn.Linear) else None
    head_norm = None
    if head is not None:
        if isinstance(model.fc_norm, nn.LayerNorm):
            head_norm = "fc_norm"
        elif isinstance(model.norm, nn.LayerNorm) and model.global_pool == "token":
            head_norm = "norm"
    return VitGraph("patch_embed.proj", tuple(blocks), head, head_norm)


def tap_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose attention modules are TapAttention (same outputs to rounding)."""
    graph = vit_graph(model)
    out = copy.deepcopy(model).eval()
    for b in graph.blocks:
        attn = out.get_submodule(b.attn)
        if not isinstance(attn, TapAttention):
            out.set_submodule(b.attn, TapAttention(attn))
    return out


def matmul_sites(graph: VitGraph) -> dict[str, str]:
    """Every attention matmul operand, mapped to the qkv layer whose settings it follows."""
    return {f"{b.attn}.{s}": b.qkv for b in graph.blocks for s in MATMUL_SITES}


def layernorm_dist(ln: nn.LayerNorm, tail: str) -> Dist:
    """LayerNorm output per channel: β_c + |γ_c|·Z, Z the normalised token (unit variance)."""
    c = ln.normalized_shape[0]
    gamma = ln.weight.detach() if ln.weight is not None else torch.ones(c)
    beta = ln.bias.detach() if ln.bias is not None else torch.zeros(c)
    inf = torch.full((c,), float("inf"))
    return Dist(beta.clone(), gamma.abs().clone(), -inf, inf, tail=tail)


def _linear_dist(layer: nn.Linear, d_in: Dist, tail: str, rows: slice = slice(None), gain: float = 1.0,
                 act: nn.Module | None = None) -> Dist:
    mean, std = _moment_layer(layer, d_in)
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


def toy_vit(seed: int = 0, dim: int = 96, depth: int = 2, heads: int = 3):
    """A small randomly initialised timm ViT shaped like a trained one, and its preprocessing.

    For tests and offline runs where no ViT weights can be had. timm's own init (std 0.02) gives
    near-uniform attention and identical LayerNorms, so weights are drawn at unit gain and the
    LayerNorm gains spread out with a few outlier channels, as in trained ViTs: what makes
    per-tensor ranges struggle. Its predictions mean nothing; its arithmetic is a real ViT's.
    """
    import math

    from timm.models.vision_transformer import VisionTransformer

    from .data import Preprocess

    gen = torch.Generator().manual_seed(seed)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=1000)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.in_features))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            elif isinstance(mod, nn.LayerNorm):
                gain = torch.exp(torch.randn(dim, generator=gen) * 0.5)
                gain[torch.randperm(dim, generator=gen)[:3]] *= 8
                mod.weight.copy_(gain)
                mod.bias.copy_(torch.randn(dim, generator=gen) * 0.5)
        proj = model.patch_embed.proj
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) / math.sqrt(proj.weight[0].numel()))
        proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.1)
        model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=gen))
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=gen) * 0.5)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pre = Preprocess(resize=248, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic")
    model.spiq_preprocess = pre
    return model, pre
