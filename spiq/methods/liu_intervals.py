"""Uniform intervals, one per tensor, and their search for output similarity (Liu et al.'s PTQ for
vision transformers, spiq.methods.liu): the grids, the alternating search, the ranking term on
attention scores, and the choice of one bit width per module under a size budget.

Softmax outputs use an unsigned grid [0, 2^b−1] (a signed grid would waste its negative half on
them); weights use [−(2^(b−1)−1), 2^(b−1)−1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from spiq.config import ConfigError
from spiq.core.quant import Grid, InputQuant, fake_quant


def max_interval(x: torch.Tensor, kind: Grid, bits: int) -> float:
    """The interval that just covers the tensor's largest magnitude: the search's unit."""
    top = Grid(kind).levels(bits)[1]
    peak = x.max() if kind == Grid.UNSIGNED else x.abs().max()
    return max(float(peak) / top, 1e-12)


def on_interval(x: torch.Tensor, delta: float, kind: Grid, bits: int) -> torch.Tensor:
    """`x` on the zero-centred grid of step `delta` (core's fake quantization, zero point 0)."""
    return fake_quant(x, delta, 0, *Grid(kind).levels(bits), arithmetic="divide")


def input_quant(delta: float, kind: Grid, bits: int, axis: int = -1) -> InputQuant:
    """The searched interval as the affine input quantizer the quantized layers run (unsigned codes:
    a signed grid's codes shifted by half its range)."""
    zero = 0 if kind == Grid.UNSIGNED else -Grid.SIGNED.levels(bits)[0]
    return InputQuant("static", bits, False, torch.tensor(delta, dtype=torch.float32),
                      torch.tensor(zero, dtype=torch.int32), axis)


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
        i = torch.randint(0, keys, (pairs,), generator=gen, device=gen.device)
        j = (i + torch.randint(1, keys, (pairs,), generator=gen, device=gen.device)) % keys   # never i itself
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


def search_intervals(a: torch.Tensor, kind_a: Grid, bits_a: int, b: torch.Tensor, kind_b: Grid, bits_b: int,
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
    aq, bq = on_interval(a, da, kind_a, bits_a), on_interval(b, db, kind_b, bits_b)
    best = start = objective(aq, bq)
    done = 0
    # Liu et al.'s order: the weight (or second operand) first, with the input fixed. A half-step
    # that changes nothing ends the search: the other operand would face the partner it already
    # answered, and give the same answer.
    for step in range(2 * rounds):
        search_b = step % 2 == 0
        done += search_b
        if search_b:
            scores = [objective(aq, on_interval(b, g * max_b, kind_b, bits_b)) for g in grid]
        else:
            scores = [objective(on_interval(a, g * max_a, kind_a, bits_a), bq) for g in grid]
        k = max(range(len(grid)), key=scores.__getitem__)
        if scores[k] <= best:
            if step > 0:
                break
            continue
        best = scores[k]
        if search_b:
            db = grid[k] * max_b
            bq = on_interval(b, db, kind_b, bits_b)
        else:
            da = grid[k] * max_a
            aq = on_interval(a, da, kind_a, bits_a)
    return Search(da, db, max_a, max_b, best, start, done)


def nuclear_norm(y: torch.Tensor) -> float:
    """Mean over samples of the nuclear norm of each sample's (tokens × channels) output."""
    return float(torch.linalg.matrix_norm(y.double(), ord="nuc").mean())


def choose_bits(costs: dict[str, dict[int, float]], sizes: dict[str, int], budget_bits: float) -> dict[str, int]:
    """One bit width per module minimising Σ cost under Σ size·bits = budget_bits·Σ size.

    Exact dynamic programme over sizes in units of their greatest common divisor. When no
    assignment lands exactly on the budget, the largest total below it is used.
    """
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
        raise ConfigError(f"mixed_precision: a budget of {budget_bits} bits is below the smallest candidate ({low} bits)")
    used = cap if cap in best else max(best)
    return dict(zip(names, best[used][1]))


def candidate_bits(budget: float) -> list[int]:
    """Bit widths offered to each module: the budget's neighbourhood, two either side."""
    return list(range(max(2, math.floor(budget) - 2), min(16, math.ceil(budget) + 2) + 1))
