"""Vision transformers: where their quantizers sit and what their inputs look like without data.

One transformer form is handled: timm's `VisionTransformer` (DeiT, ViT; the registry converts
torchvision's ViT into it). Its attention runs through `F.scaled_dot_product_attention`, which
hides both matmuls, so `tap_attention` rebuilds every attention module as `TapAttention`: the same
arithmetic with the softmax written out and an `ActQuant` in front of each matmul operand. A float
model carrying TapAttention is the reference every quantized transformer is compared with, and its
taps are where hooks observe scores and attention maps.
The data-free laws of its inputs are in `spiq.ranges.vit`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from spiq.core.errors import SpiqError
from spiq.core.quant import ActQuant

# The operands of the two attention matmuls, as TapAttention names them.
MATMUL_SITES = ("q_in", "k_in", "p_in", "v_in")


class TransformerError(SpiqError, ValueError):
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


def toy_vit(seed: int = 0, dim: int = 96, depth: int = 2, heads: int = 3):
    """A small randomly initialised timm ViT shaped like a trained one, and its preprocessing.

    For tests and offline runs where no ViT weights can be had. timm's own init (std 0.02) gives
    near-uniform attention and identical LayerNorms, so weights are drawn at unit gain and the
    LayerNorm gains spread out with a few outlier channels, as in trained ViTs: what makes
    per-tensor ranges struggle. Its predictions mean nothing; its arithmetic is a real ViT's.
    """
    import math

    from timm.models.vision_transformer import VisionTransformer

    from spiq.models.data import Preprocess

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
    return model, pre
