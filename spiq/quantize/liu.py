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
every row, fixed seed) on the pre-softmax scores; softmax outputs use an unsigned grid [0, 2^b−1]
(a signed grid would waste its negative half on them); weights use [−(2^(b−1)−1), 2^(b−1)−1].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from spiq.core.hooks import run_with_hooks
from spiq.core.quant import InputQuant
from spiq.core.quant import fake_quant as core_fake_quant
from spiq.models.vit import BlockNames, VitGraph

KINDS = ("weight", "signed", "unsigned")


def levels(kind: str, bits: int) -> tuple[int, int]:
    if kind == "weight":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    if kind == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def max_interval(x: torch.Tensor, kind: str, bits: int) -> float:
    """The interval that just covers the tensor's largest magnitude: the search's unit."""
    top = levels(kind, bits)[1]
    peak = x.max() if kind == "unsigned" else x.abs().max()
    return max(float(peak) / top, 1e-12)


def fake_quant(x: torch.Tensor, delta: float, kind: str, bits: int) -> torch.Tensor:
    return core_fake_quant(x, delta, 0, *levels(kind, bits))


def input_quant(delta: float, kind: str, bits: int, axis: int = -1) -> InputQuant:
    """The searched interval as the affine input quantizer the quantized layers run."""
    zero = 0 if kind == "unsigned" else 2 ** (bits - 1)
    return InputQuant("static", bits, False, torch.tensor(delta, dtype=torch.float32),
                      torch.tensor(zero, dtype=torch.int32), axis)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the samples (dim 0) of the Pearson correlation of each sample's values."""
    return Similarity(b)(a)


class Similarity:
    """Mean per-sample Pearson correlation with a fixed target, its centring and norm done once.

    A search scores hundreds of candidates against one target: each costs a centring, a dot
    product and a norm, in float32 with float64 only where the target is normalised.
    """

    def __init__(self, target: torch.Tensor):
        t = target.reshape(target.shape[0], -1).double()
        t = t - t.mean(1, keepdim=True)
        self.unit = (t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        o = out.reshape(out.shape[0], -1)
        o = o - o.mean(1, keepdim=True)
        return (torch.linalg.vecdot(o, self.unit) / o.norm(dim=1).clamp_min(1e-30)).mean()


@dataclass(frozen=True)
class RankPairs:
    """Key pairs (i, j) compared in every query row of the attention scores."""
    i: torch.Tensor
    j: torch.Tensor

    @classmethod
    def sample(cls, keys: int, pairs: int, seed: int = 0) -> "RankPairs":
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(0, keys, (pairs,), generator=gen)
        j = (i + torch.randint(1, keys, (pairs,), generator=gen)) % keys   # never i itself
        return cls(i, j)

    def signs(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sign(scores[..., self.i] - scores[..., self.j])

    def hinge(self, target_signs: torch.Tensor, scores: torch.Tensor, margin: float) -> torch.Tensor:
        """Mean of max(θ − (ŝ_i − ŝ_j)·sign(s_i − s_j), 0) over the pairs whose float order is strict."""
        gap = (scores[..., self.i] - scores[..., self.j]) * target_signs
        strict = target_signs != 0
        return (torch.relu(margin - gap) * strict).sum() / strict.sum().clamp_min(1)

    def inversions(self, target: torch.Tensor, scores: torch.Tensor) -> tuple[int, int]:
        """(pairs whose order the quantized scores reverse, pairs with a strict float order)."""
        t = self.signs(target)
        return int(((self.signs(scores) * t) < 0).sum()), int((t != 0).sum())


@dataclass
class Search:
    """One site's searched intervals: operand a (the input) and b (the weight or second input)."""
    delta_a: float
    delta_b: float
    max_a: float
    max_b: float
    score: float          # objective at the searched intervals, on the calibration samples
    max_score: float      # ... at the max-based intervals
    rounds: int


def search_intervals(a: torch.Tensor, kind_a: str, bits_a: int, b: torch.Tensor, kind_b: str, bits_b: int,
                     fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor,
                     points: int = 100, rounds: int = 20,
                     penalty: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Search:
    """Alternating interval search: fix a, pick b's interval on the grid, fix b, pick a's; repeat.

    Candidates are `points` intervals evenly spaced over [0.5, 1.2] × the max-based interval, plus
    the max-based interval itself, so the search never ends below where it started.
    """
    grid = torch.unique(torch.cat([torch.linspace(0.5, 1.2, points), torch.ones(1)])).tolist()
    max_a, max_b = max_interval(a, kind_a, bits_a), max_interval(b, kind_b, bits_b)
    similarity = Similarity(target)

    def objective(aq, bq) -> float:
        out = fn(aq, bq)
        s = similarity(out)
        return float(s - penalty(out)) if penalty is not None else float(s)

    da, db = max_a, max_b
    aq, bq = fake_quant(a, da, kind_a, bits_a), fake_quant(b, db, kind_b, bits_b)
    best = start = objective(aq, bq)
    done = 0
    # Liu et al.'s order: the weight (or second operand) first, with the input fixed. A half-step
    # that changes nothing ends the search: the other operand would face the partner it already
    # answered, and give the same answer.
    for step in range(2 * rounds):
        search_b = step % 2 == 0
        done += search_b
        if search_b:
            scores = [objective(aq, fake_quant(b, g * max_b, kind_b, bits_b)) for g in grid]
        else:
            scores = [objective(fake_quant(a, g * max_a, kind_a, bits_a), bq) for g in grid]
        k = max(range(len(grid)), key=scores.__getitem__)
        if scores[k] <= best:
            if step > 0:
                break
            continue
        best = scores[k]
        if search_b:
            db = grid[k] * max_b
            bq = fake_quant(b, db, kind_b, bits_b)
        else:
            da = grid[k] * max_a
            aq = fake_quant(a, da, kind_a, bits_a)
    return Search(da, db, max_a, max_b, best, start, done)


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
    kind_a: str
    kind_b: str
    bias_shift: torch.Tensor | None = None

    def quantize_a(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.search.delta_a, self.kind_a, self.bits_a)

    def quantize_b(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.search.delta_b, self.kind_b, self.bits_b)

    def weight_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = levels("weight", self.bits_b)
        return torch.clamp(torch.round(w / self.search.delta_b), lo, hi), torch.tensor(self.search.delta_b)


def patches(images: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A patch embedding's input as the linear sees it: (S, patches, C·k·k) rows."""
    if conv.kernel_size != conv.stride or any(conv.padding) or conv.groups != 1:
        raise ValueError("the patch embedding must be a conv whose kernel equals its stride, unpadded")
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
    kind_a: str
    b: torch.Tensor
    kind_b: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: torch.Tensor
    pairs: RankPairs | None = None   # attention scores: the ranking term's pairs


class _Searcher:
    """Searches sites on demand, each (site, bits) once; the memo may outlive one quantize() call."""

    def __init__(self, model: nn.Module, graph: VitGraph, calib: Calibration, settings: LiuSettings, memo: dict):
        self.model, self.graph, self.calib, self.s, self.memo = model, graph, calib, settings, memo
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
            return _Operands(o.q, "signed", o.k, "signed", matmul, o.scores, pairs)
        if role == "pv":
            return _Operands(o.p, "unsigned", o.v, "signed", torch.matmul, o.p @ o.v)
        a = {"qkv": lambda: o.x[:, self.calib.rows], "proj": lambda: o.attn_out, "fc1": lambda: o.fc1_in,
             "fc2": lambda: o.fc2_in}[role]()
        return self._linear(self.model.get_submodule(site), a)

    @staticmethod
    def _linear(layer: nn.Module, a: torch.Tensor) -> _Operands:
        w = layer.weight.detach().flatten(1)  # a patch embedding runs as a linear on its patches

        def fn(x, w, bias=layer.bias):
            return F.linear(x, w, bias)

        return _Operands(a, "signed", w, "weight", fn, fn(a, w))

    def site(self, name: str, bits_b: int, bits_a: int) -> Site:
        """Search one site: a layer (weight bits, input bits) or a matmul "<attn>.qk"/"<attn>.pv"."""
        key = ("liu", name, bits_b, bits_a, self.calib.key, self.s)
        if key not in self.memo:
            op = self.operands(name)
            penalty = None
            if op.pairs is not None:
                signs = op.pairs.signs(op.target)

                def penalty(out):
                    return self.s.rank_weight * op.pairs.hinge(signs, out, self.s.rank_margin)

            found = search_intervals(op.a, op.kind_a, bits_a, op.b, op.kind_b, bits_b, op.fn, op.target,
                                     self.s.points, self.s.rounds, penalty)
            site = Site(found, bits_a, bits_b, op.kind_a, op.kind_b)
            if self.s.bias_correction and op.kind_b == "weight":
                out = op.fn(site.quantize_a(op.a), site.quantize_b(op.b))
                site.bias_shift = (op.target - out).reshape(-1, out.shape[-1]).mean(0)
            self.memo[key] = site
        return self.memo[key]

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
        bias = layer.bias if layer.bias is not None else torch.zeros(codes.shape[0])
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


def nuclear_norm(y: torch.Tensor) -> float:
    """Mean over samples of the nuclear norm of each sample's (tokens × channels) output."""
    return float(torch.linalg.matrix_norm(y.double(), ord="nuc").mean())


def choose_bits(costs: dict[str, dict[int, float]], sizes: dict[str, int], budget_bits: float) -> dict[str, int]:
    """One bit width per module minimising Σ cost under Σ size·bits = budget_bits·Σ size.

    Exact dynamic programme over sizes in units of their greatest common divisor. When no
    assignment lands exactly on the budget, the largest total below it is used.
    """
    import math

    names = list(costs)
    unit = 0
    for n in names:
        unit = math.gcd(unit, sizes[n])
    units = {n: sizes[n] // unit for n in names}
    total = sum(units.values())
    cap = int(math.floor(budget_bits * total + 1e-9))
    # best[c] = (cost, choice) for a used capacity c
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for n in names:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (cost, picks) in best.items():
            for bits, c in sorted(costs[n].items()):
                u = used + units[n] * bits
                if u > cap:
                    continue
                cand = (cost + c, picks + (bits,))
                if u not in nxt or cand[0] < nxt[u][0]:
                    nxt[u] = cand
        best = nxt
    if not best:
        low = min(min(c) for c in costs.values())
        raise ValueError(f"a budget of {budget_bits} bits is below the smallest candidate ({low} bits)")
    used = cap if cap in best else max(best)
    return dict(zip(names, best[used][1]))


def candidate_bits(budget: float) -> list[int]:
    """Bit widths offered to each module: the budget's neighbourhood, two either side."""
    import math

    return list(range(max(2, math.floor(budget) - 2), min(16, math.ceil(budget) + 2) + 1))


def plan(model: nn.Module, graph: VitGraph, calib: Calibration, bits: Callable[[str], tuple[int, int] | None],
         settings: LiuSettings, mixed_precision: float | None = None, memo: dict | None = None,
         progress: Callable[[float, str], None] | None = None) -> LiuPlan:
    """Search every site of the transformer.

    `bits(layer)` gives (weight bits, input bits) of a layer, None to leave it float; the
    attention matmuls follow their qkv layer. With `mixed_precision` (average bits), one width per
    attention and per MLP module replaces those of the blocks' layers.
    """
    memo = {} if memo is None else memo
    sr = _Searcher(model, graph, calib, settings, memo)
    out = LiuPlan()
    # block by block, so each block's activations can be dropped once both its modules are done
    modules = [m for b in graph.blocks for m in ((b, "attn", b.attention_layers), (b, "mlp", b.mlp_layers))]
    steps = len(modules) + 2
    step = 0

    def tick(what):
        nonlocal step
        if progress is not None:
            progress(step / steps, what)
        step += 1

    if mixed_precision is not None:
        costs: dict[str, dict[int, float]] = {}
        sizes: dict[str, int] = {}
        for b, kind, layers in modules:
            if any(bits(n) is None for n in layers):
                continue
            mod = b.attn if kind == "attn" else b.mlp
            tick(f"mixed precision: {mod}")
            run = sr.attention if kind == "attn" else sr.mlp
            output = sr.attention_output if kind == "attn" else sr.mlp_output
            ref = output(b, None)
            nuc = nuclear_norm(ref)
            costs[mod] = {c: nuc * float(((output(b, run(b, (c, c))) - ref) ** 2).mean())
                          for c in candidate_bits(mixed_precision)}
            sizes[mod] = sum(model.get_submodule(n).weight.numel() for n in layers)
            if kind == "mlp":
                sr.ops.pop(b.attn, None)
        if costs:
            out.module_bits = choose_bits(costs, sizes, mixed_precision)
        step = len(modules)
    for b, kind, layers in modules:
        active = [n for n in layers if bits(n) is not None]
        if not active:
            continue
        mod = b.attn if kind == "attn" else b.mlp
        if mixed_precision is None:
            tick(f"searching {mod}")

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
    tick("patch embedding and head")
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
    sr = _Searcher(model, graph, calib, LiuSettings(), {})
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
        out[name] = SiteScore(float(pearson(y, op.target)), float(pearson(y_max, op.target)), float(err))
    return out


@torch.no_grad()
def inversions(model: nn.Module, graph: VitGraph, plan: LiuPlan, calib: Calibration,
               pairs: int = 64) -> dict[str, tuple[int, int]]:
    """Per attention, (key pairs whose score order the quantized scores reverse, pairs compared)."""
    sr = _Searcher(model, graph, calib, LiuSettings(rank_pairs=pairs), {})
    return {f"{b.attn}.qk": sr.inversions(b, plan.matmuls[f"{b.attn}.qk"])
            for b in graph.blocks if f"{b.attn}.qk" in plan.matmuls}
