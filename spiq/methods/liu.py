"""Liu et al., "Post-Training Quantization for Vision Transformer" (NeurIPS 2021).

Every matmul of a ViT is quantized: each linear (its weights and its input) and both attention
matmuls (their two activation operands), one uniform interval per tensor. The intervals are
searched on calibration images to maximise the mean Pearson correlation between the float and
the quantized output, alternating between the two operands; the attention scores add a pairwise
ranking term. Then bias correction; optionally one bit width per attention and per MLP module,
from nuclear norm × output error under a model-size budget.

Choices the paper leaves open, made here: each layer is searched in isolation (float inputs, as
the float model computes them), on a fixed random subsample of `search_tokens` tokens (query rows
for the attention matmuls; keys stay whole) so the cost does not grow with the token count; the
ranking term is the mean hinge over `rank_pairs` random key pairs per query row (the same pairs in
every row, fixed seed) on the pre-softmax scores. The grids and the search itself:
spiq.methods.liu_intervals.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from spiq.core.hooks import run_with_hooks
from spiq.core.quant import Grid
from spiq.methods.liu_intervals import (RankPairs, Search, Similarity, candidate_bits, choose_bits, nuclear_norm,
                                        on_interval, search_intervals)
from spiq.models.vit import BlockNames, TransformerError, VitGraph

# --- the calibration data each site is searched on ---------------------------------------------

@dataclass
class Calibration:
    """Float activations at every quantized site of a ViT, from calibration images.

    Per block the attention input is kept whole (attention mixes tokens); everything else keeps
    the fixed token subsample `rows`.
    """
    images: torch.Tensor
    attn_in: dict[str, torch.Tensor]     # qkv name -> (S, N, D)
    mlp_in: dict[str, torch.Tensor]      # fc1 name -> (S, T, D)
    head_in: torch.Tensor | None         # (S, D)
    rows: torch.Tensor                   # token indices of the subsample
    key: str                             # identifies the images, for memoised searches


@torch.no_grad()
def collect(model: nn.Module, graph: VitGraph, images: torch.Tensor, tokens: int, seed: int = 0) -> Calibration:
    attn_in: dict[str, list] = {b.qkv: [] for b in graph.blocks}
    mlp_in: dict[str, list] = {b.fc1: [] for b in graph.blocks}
    head_in: list = []
    state: dict = {}

    def rows_of(n: int) -> torch.Tensor:
        if "rows" not in state:
            gen = torch.Generator().manual_seed(seed)
            state["rows"] = torch.randperm(n, generator=gen)[: min(tokens, n)].sort().values
        return state["rows"]

    def keep(store, subsample):
        def hook(_mod, args):
            x = args[0].detach()
            store.append(x[:, rows_of(x.shape[1])] if subsample and x.dim() == 3 else x)
        return hook

    hooks = {b.qkv: keep(attn_in[b.qkv], False) for b in graph.blocks}
    hooks.update({b.fc1: keep(mlp_in[b.fc1], True) for b in graph.blocks})
    if graph.head is not None:
        hooks[graph.head] = keep(head_in, False)
    run_with_hooks(model, hooks, images, pre=True)
    digest = hashlib.sha1(images.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
    return Calibration(images, {k: torch.cat(v) for k, v in attn_in.items()},
                       {k: torch.cat(v) for k, v in mlp_in.items()},
                       torch.cat(head_in) if head_in else None, state["rows"], f"{digest}:{tokens}:{seed}")


# --- the sites -----------------------------------------------------------------------------------

@dataclass
class Site:
    """What one searched site became: quantizers for both operands, and the bias shift."""
    search: Search
    bits_a: int
    bits_b: int
    kind_a: Grid
    kind_b: Grid
    bias_shift: torch.Tensor | None = None

    def quantize_a(self, x: torch.Tensor) -> torch.Tensor:
        return on_interval(x, self.search.delta_a, self.kind_a, self.bits_a)

    def quantize_b(self, x: torch.Tensor) -> torch.Tensor:
        return on_interval(x, self.search.delta_b, self.kind_b, self.bits_b)

    def weight_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = Grid.WEIGHT.levels(self.bits_b)
        return torch.clamp(torch.round(w / self.search.delta_b), lo, hi), torch.tensor(self.search.delta_b)


def patches(images: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A patch embedding's input as the linear sees it: (S, patches, C·k·k) rows."""
    if conv.kernel_size != conv.stride or any(conv.padding) or conv.groups != 1:
        raise TransformerError("the patch embedding must be a conv whose kernel equals its stride, unpadded")
    return F.unfold(images, conv.kernel_size, stride=conv.stride).transpose(1, 2)


@dataclass
class _Ops:
    """Float inputs of every site of one block, computed once from the calibration activations."""
    x: torch.Tensor       # attention input, whole (S, N, D)
    q: torch.Tensor       # (S, H, T, hd), the scale folded in
    k: torch.Tensor       # (S, H, N, hd)
    v: torch.Tensor
    p: torch.Tensor       # attention map rows (S, H, T, N)
    scores: torch.Tensor  # pre-softmax scores rows (S, H, T, N)
    attn_out: torch.Tensor  # proj input rows (S, T, D)
    fc1_in: torch.Tensor
    fc2_in: torch.Tensor


def _block_ops(model: nn.Module, b: BlockNames, calib: Calibration) -> _Ops:
    attn = model.get_submodule(b.attn)
    x = calib.attn_in[b.qkv]
    s = x.shape[0]
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.heads(attn.qkv(x))
    rows = calib.rows
    q = q[:, :, rows] * attn.scale
    scores = q @ k.transpose(-2, -1)
    p = scores.softmax(-1)
    attn_out = (p @ v).transpose(1, 2).reshape(s, len(rows), h * hd)
    fc1_in = calib.mlp_in[b.fc1]
    fc2_in = model.get_submodule(b.mlp).act(model.get_submodule(b.fc1)(fc1_in))
    return _Ops(x, q, k, v, p, scores, attn_out, fc1_in, fc2_in)


@dataclass
class LiuPlan:
    """The searched quantizers of a whole ViT, and the bits mixed precision chose."""
    layers: dict[str, Site] = field(default_factory=dict)     # linear/conv name -> site
    matmuls: dict[str, Site] = field(default_factory=dict)    # "<attn>.qk" / "<attn>.pv" -> site
    module_bits: dict[str, int] = field(default_factory=dict)  # "<block>.attn" / "<block>.mlp" -> bits
    inversions: dict[str, tuple[int, int]] = field(default_factory=dict)  # "<attn>.qk" -> (reversed, pairs)


@dataclass(frozen=True)
class LiuSettings:
    points: int = 100
    rounds: int = 20
    rank_weight: float = 0.1
    rank_margin: float = 0.2
    rank_pairs: int = 64
    bias_correction: bool = True


@dataclass
class _Operands:
    """One site's search problem: out = fn(a, b) against the float target."""
    a: torch.Tensor
    kind_a: Grid
    b: torch.Tensor
    kind_b: Grid
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: torch.Tensor
    pairs: RankPairs | None = None   # attention scores: the ranking term's pairs


def _call_memo(store: dict) -> Callable:
    """A memo over a plain dict, for a search of its own (the quantizer's memo outlives one)."""
    def memo(key, make):
        if key not in store:
            store[key] = make()
        return store[key]
    return memo


class _Searcher:
    """Searches sites on demand, each (site, bits) once; the memo may outlive one quantize() call."""

    def __init__(self, model: nn.Module, graph: VitGraph, calib: Calibration, settings: LiuSettings,
                 memo: Callable | None):
        self.model, self.graph, self.calib, self.s = model, graph, calib, settings
        self.memo = memo if memo is not None else _call_memo({})
        self.ops: dict[str, _Ops] = {}
        self.block_of = {n: (b, role) for b in graph.blocks
                         for role, n in (("qkv", b.qkv), ("proj", b.proj), ("fc1", b.fc1), ("fc2", b.fc2),
                                         ("qk", f"{b.attn}.qk"), ("pv", f"{b.attn}.pv"))}

    def block_ops(self, b: BlockNames) -> _Ops:
        if b.attn not in self.ops:
            self.ops[b.attn] = _block_ops(self.model, b, self.calib)
        return self.ops[b.attn]

    def operands(self, site: str) -> _Operands:
        """The float tensors a site is searched (or scored) on."""
        if site in (self.graph.patch, self.graph.head):
            layer = self.model.get_submodule(site)
            if site == self.graph.patch:
                rows = patches(self.calib.images, layer)
                a = rows[:, self.calib.rows[self.calib.rows < rows.shape[1]]]
            else:
                a = self.calib.head_in
            return self._linear(layer, a)
        b, role = self.block_of[site]
        o = self.block_ops(b)
        if role == "qk":
            def matmul(x, y):
                return x @ y.transpose(-2, -1)

            pairs = RankPairs.sample(o.k.shape[2], self.s.rank_pairs) if self.s.rank_weight > 0 else None
            return _Operands(o.q, Grid.SIGNED, o.k, Grid.SIGNED, matmul, o.scores, pairs)
        if role == "pv":
            return _Operands(o.p, Grid.UNSIGNED, o.v, Grid.SIGNED, torch.matmul, o.p @ o.v)
        a = {"qkv": lambda: o.x[:, self.calib.rows], "proj": lambda: o.attn_out, "fc1": lambda: o.fc1_in,
             "fc2": lambda: o.fc2_in}[role]()
        return self._linear(self.model.get_submodule(site), a)

    @staticmethod
    def _linear(layer: nn.Module, a: torch.Tensor) -> _Operands:
        w = layer.weight.detach().flatten(1)  # a patch embedding runs as a linear on its patches

        def fn(x, w, bias=layer.bias):
            return F.linear(x, w, bias)

        return _Operands(a, Grid.SIGNED, w, Grid.WEIGHT, fn, fn(a, w))

    def site(self, name: str, bits_b: int, bits_a: int) -> Site:
        """Search one site: a layer (weight bits, input bits) or a matmul "<attn>.qk"/"<attn>.pv"."""
        key = ("liu", name, bits_b, bits_a, self.calib.key, self.s)
        return self.memo(key, lambda: self._search_site(name, bits_b, bits_a))

    def _search_site(self, name: str, bits_b: int, bits_a: int) -> Site:
        op = self.operands(name)
        penalty = None
        if op.pairs is not None:
            signs = op.pairs.signs(op.target)

            def penalty(out):
                return self.s.rank_weight * op.pairs.hinge(signs, out, self.s.rank_margin)

        found = search_intervals(op.a, op.kind_a, bits_a, op.b, op.kind_b, bits_b, op.fn, op.target,
                                 self.s.points, self.s.rounds, penalty)
        site = Site(found, bits_a, bits_b, op.kind_a, op.kind_b)
        if self.s.bias_correction and op.kind_b == Grid.WEIGHT:
            out = op.fn(site.quantize_a(op.a), site.quantize_b(op.b))
            site.bias_shift = (op.target - out).reshape(-1, out.shape[-1]).mean(0)
        return site

    def attention(self, b: BlockNames, bits: tuple[int, int]) -> dict[str, Site]:
        wb, ab = bits
        return {b.qkv: self.site(b.qkv, wb, ab), f"{b.attn}.qk": self.site(f"{b.attn}.qk", ab, ab),
                f"{b.attn}.pv": self.site(f"{b.attn}.pv", ab, ab), b.proj: self.site(b.proj, wb, ab)}

    def mlp(self, b: BlockNames, bits: tuple[int, int]) -> dict[str, Site]:
        wb, ab = bits
        return {b.fc1: self.site(b.fc1, wb, ab), b.fc2: self.site(b.fc2, wb, ab)}

    # --- module outputs, for mixed precision --------------------------------------------------
    def _qlinear(self, name: str, x: torch.Tensor, site: Site) -> torch.Tensor:
        layer = self.model.get_submodule(name)
        codes, scale = site.weight_codes(layer.weight.detach())
        bias = layer.bias if layer.bias is not None else codes.new_zeros(codes.shape[0])
        if site.bias_shift is not None:
            bias = bias + site.bias_shift
        return F.linear(site.quantize_a(x), codes * scale, bias)

    def attention_output(self, b: BlockNames, sites: dict[str, Site] | None) -> torch.Tensor:
        """The attention module's output rows, float (sites None) or with every site quantized."""
        attn = self.model.get_submodule(b.attn)
        o = self.block_ops(b)
        if sites is None:
            return attn.proj(o.attn_out)
        s = o.x.shape[0]
        h, hd = attn.num_heads, attn.head_dim
        q, k, v = attn.heads(self._qlinear(b.qkv, o.x, sites[b.qkv]))
        qk, pv = sites[f"{b.attn}.qk"], sites[f"{b.attn}.pv"]
        scores = qk.quantize_a(q[:, :, self.calib.rows] * attn.scale) @ qk.quantize_b(k).transpose(-2, -1)
        out = pv.quantize_a(scores.softmax(-1)) @ pv.quantize_b(v)
        return self._qlinear(b.proj, out.transpose(1, 2).reshape(s, -1, h * hd), sites[b.proj])

    def mlp_output(self, b: BlockNames, sites: dict[str, Site] | None) -> torch.Tensor:
        o = self.block_ops(b)
        fc2 = self.model.get_submodule(b.fc2)
        if sites is None:
            return fc2(o.fc2_in)
        act = self.model.get_submodule(b.mlp).act
        return self._qlinear(b.fc2, act(self._qlinear(b.fc1, o.fc1_in, sites[b.fc1])), sites[b.fc2])

    def inversions(self, b: BlockNames, site: Site) -> tuple[int, int]:
        o = self.block_ops(b)
        pairs = RankPairs.sample(o.k.shape[2], self.s.rank_pairs)
        return pairs.inversions(o.scores, site.quantize_a(o.q) @ site.quantize_b(o.k).transpose(-2, -1))


class _Progress:
    """A plan's progress: one step per module searched, then the patch embedding and head."""

    def __init__(self, report: Callable[[float, str], None] | None, steps: int):
        self.report, self.steps, self.step = report, steps, 0

    def tick(self, what: str) -> None:
        if self.report is not None:
            self.report(self.step / self.steps, what)
        self.step += 1


def _module_bits(sr: _Searcher, modules: list, bits: Callable[[str], tuple[int, int] | None], budget: float,
                 progress: _Progress) -> dict[str, int]:
    """One width per attention and MLP module, from nuclear norm × output error under `budget` bits."""
    costs: dict[str, dict[int, float]] = {}
    sizes: dict[str, int] = {}
    for b, kind, layers in modules:
        if any(bits(n) is None for n in layers):
            continue
        mod = b.attn if kind == "attn" else b.mlp
        progress.tick(f"mixed precision: {mod}")
        run = sr.attention if kind == "attn" else sr.mlp
        output = sr.attention_output if kind == "attn" else sr.mlp_output
        ref = output(b, None)
        nuc = nuclear_norm(ref)
        costs[mod] = {c: nuc * float(((output(b, run(b, (c, c))) - ref) ** 2).mean()) for c in candidate_bits(budget)}
        sizes[mod] = sum(sr.model.get_submodule(n).weight.numel() for n in layers)
        if kind == "mlp":
            sr.ops.pop(b.attn, None)
    return choose_bits(costs, sizes, budget) if costs else {}


def plan(model: nn.Module, graph: VitGraph, calib: Calibration, bits: Callable[[str], tuple[int, int] | None],
         settings: LiuSettings, mixed_precision: float | None = None, memo: Callable | None = None,
         progress: Callable[[float, str], None] | None = None) -> LiuPlan:
    """Search every site of the transformer.

    `bits(layer)` gives (weight bits, input bits) of a layer, None to leave it float; the
    attention matmuls follow their qkv layer. With `mixed_precision` (average bits), one width per
    attention and per MLP module replaces those of the blocks' layers.
    """
    sr = _Searcher(model, graph, calib, settings, memo)
    out = LiuPlan()
    # block by block, so each block's activations can be dropped once both its modules are done
    modules = [m for b in graph.blocks for m in ((b, "attn", b.attention_layers), (b, "mlp", b.mlp_layers))]
    ticks = _Progress(progress, len(modules) + 2)
    if mixed_precision is not None:
        out.module_bits = _module_bits(sr, modules, bits, mixed_precision, ticks)
        ticks.step = len(modules)
    for b, kind, layers in modules:
        active = [n for n in layers if bits(n) is not None]
        if not active:
            continue
        mod = b.attn if kind == "attn" else b.mlp
        if mixed_precision is None:
            ticks.tick(f"searching {mod}")

        def width(name, mod=mod):
            return (out.module_bits[mod],) * 2 if mod in out.module_bits else bits(name)

        for name in active:
            out.layers[name] = sr.site(name, *width(name))
        if kind == "attn" and b.qkv in active:   # the matmuls follow the qkv layer's input bits
            ab = width(b.qkv)[1]
            for op in ("qk", "pv"):
                out.matmuls[f"{b.attn}.{op}"] = sr.site(f"{b.attn}.{op}", ab, ab)
            out.inversions[f"{b.attn}.qk"] = sr.inversions(b, out.matmuls[f"{b.attn}.qk"])
        if kind == "mlp":
            sr.ops.pop(b.attn, None)
    ticks.tick("patch embedding and head")
    for name in (graph.patch, graph.head):
        if name is not None and bits(name) is not None and (name != graph.head or calib.head_in is not None):
            out.layers[name] = sr.site(name, *bits(name))
    return out


@dataclass
class SiteScore:
    """How a searched site does on a set of images (held out from its calibration, say)."""
    pearson: float         # output correlation at the searched intervals
    pearson_max: float     # ... at the max-based intervals of the calibration set
    mean_error: float      # |mean output error| averaged over output channels, bias correction included


@torch.no_grad()
def score(model: nn.Module, graph: VitGraph, plan: LiuPlan, calib: Calibration) -> dict[str, SiteScore]:
    """Every searched site's output correlation and mean error on the images of `calib`."""
    sr = _Searcher(model, graph, calib, LiuSettings(), None)
    out = {}
    for name, site in {**plan.layers, **plan.matmuls}.items():
        op = sr.operands(name)
        found = site.search
        max_site = Site(Search(found.max_a, found.max_b, found.max_a, found.max_b, 0.0, 0.0, 0),
                        site.bits_a, site.bits_b, site.kind_a, site.kind_b)
        y = op.fn(site.quantize_a(op.a), site.quantize_b(op.b))
        if site.bias_shift is not None:
            y = y + site.bias_shift
        y_max = op.fn(max_site.quantize_a(op.a), max_site.quantize_b(op.b))
        err = (op.target - y).reshape(-1, y.shape[-1]).mean(0).abs().mean()
        similarity = Similarity(op.target)
        out[name] = SiteScore(float(similarity(y)), float(similarity(y_max)), float(err))
    return out


@torch.no_grad()
def inversions(model: nn.Module, graph: VitGraph, plan: LiuPlan, calib: Calibration,
               pairs: int = 64) -> dict[str, tuple[int, int]]:
    """Per attention, (key pairs whose score order the quantized scores reverse, pairs compared)."""
    sr = _Searcher(model, graph, calib, LiuSettings(rank_pairs=pairs), None)
    return {f"{b.attn}.qk": sr.inversions(b, plan.matmuls[f"{b.attn}.qk"])
            for b in graph.blocks if f"{b.attn}.qk" in plan.matmuls}
