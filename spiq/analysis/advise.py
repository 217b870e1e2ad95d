"""A mixed-precision recipe under a budget of average bits, from the data-free sensitivity table.

Each layer's logit error at a width is taken as additive noise power (10^(-SQNR/10), summed over
layers), so the best widths are those of a multiple-choice knapsack, which a dynamic programme
solves exactly. See docs/advise.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from spiq.config import ConfigError, LayerOverride, QuantConfig
from spiq.analysis.sensitivity import LayerSensitivity, predicted_sqnr_db

# The budget's resolution: bits are counted in at most STEPS units over the whole span of widths,
# each layer's cost rounded up and the budget down, so every recipe found is within it exactly.
STEPS = 16000


@dataclass
class Advice:
    """The recipe and what the sensitivity table predicts for it."""
    config: QuantConfig
    input_bits: dict[str, int]           # per layer
    weight_bits: dict[str, int]
    input_budget_used: float             # average input width, weighted by input values per image
    weight_budget_used: float            # average weight width, weighted by weight count
    predicted_sqnr_db: float             # logit SQNR of the sum of the layers' noise

    def to_dict(self) -> dict:
        return {"input_budget_used": self.input_budget_used, "weight_budget_used": self.weight_budget_used,
                "predicted_sqnr_db": self.predicted_sqnr_db, "input_bits": self.input_bits,
                "weight_bits": self.weight_bits, "recipe": self.config.to_dict()}


def check_widths(widths) -> list[int]:
    widths = sorted(set(widths))
    if not widths or any(not isinstance(b, int) or not 2 <= b <= 16 for b in widths):
        raise ConfigError(f"widths must be integers from 2 to 16, got {list(widths)}")
    return widths


def check_budget(budget: float, widths: list[int], what: str = "budget") -> None:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)) or not widths[0] <= budget <= widths[-1]:
        raise ConfigError(f"{what} must lie from the smallest width ({widths[0]}) to the largest ({widths[-1]}), "
                          f"got {budget}")


def allocate(noise: list[dict[int, float]], sizes: list[int], budget: float) -> list[int]:
    """The widths (one per layer, from its `noise` keys) that minimise the summed noise with
    Σ sizes·width ≤ budget·Σ sizes: a multiple-choice knapsack, solved by dynamic programming over
    the bits spent above the smallest width (exactly where Σ sizes is small; else in STEPS, each
    cost rounded up, then what the rounding left is spent on the best upgrades that still fit)."""
    widths, total = sorted(noise[0]), sum(sizes)
    scale = max(1, math.ceil(total * (widths[-1] - widths[0]) / STEPS))
    allowed = (budget - widths[0]) * total   # bits above the smallest width, exactly
    capacity = int(math.floor(allowed / scale + 1e-9))
    best = np.zeros(capacity + 1)   # least noise of the layers so far, spending at most each amount
    choices = []
    for layer_noise, size in zip(noise, sizes):
        new, pick = np.full(capacity + 1, np.inf), np.zeros(capacity + 1, dtype=np.int64)
        for b in widths:
            cost = -(-size * (b - widths[0]) // scale)
            if cost <= capacity:
                cand = np.full(capacity + 1, np.inf)
                cand[cost:] = best[: capacity + 1 - cost] + layer_noise[b]
                better = cand < new
                new[better], pick[better] = cand[better], b
        best = new
        choices.append(pick)
    spend, out = int(np.argmin(best)), []
    for size, pick in zip(reversed(sizes), reversed(choices)):
        out.append(int(pick[spend]))
        spend -= -(-size * (out[-1] - widths[0]) // scale)
    return _top_up(out[::-1], noise, sizes, allowed, widths[0])


def _top_up(chosen: list[int], noise: list[dict[int, float]], sizes: list[int], allowed: float, low: int) -> list[int]:
    """Spend what rounding the costs up left: the upgrade removing the most noise per bit that
    still fits, until none does."""
    left = allowed - sum(s * (b - low) for s, b in zip(sizes, chosen))
    while True:
        options = [((noise[i][chosen[i]] - noise[i][b]) / (sizes[i] * (b - chosen[i])), i, b)
                   for i in range(len(chosen)) for b in noise[i]
                   if b > chosen[i] and sizes[i] * (b - chosen[i]) <= left + 1e-9 and noise[i][b] < noise[i][chosen[i]]]
        if not options:
            return chosen
        _, i, b = max(options)
        left -= sizes[i] * (b - chosen[i])
        chosen[i] = b


def advise(table: list[LayerSensitivity], config: QuantConfig, budget: float, widths=(4, 5, 6, 8),
           weight_budget: float | None = None) -> Advice:
    """Per-layer input widths (and weight widths, with `weight_budget`) from `widths` that maximise
    the predicted logit SQNR with the input width averaged over the layers, weighted by each
    layer's input values per image, at most `budget` (weights: weighted by weight count). Layers
    keep `config.weight_bits` without a weight budget. The recipe is `config` with per-layer
    overrides wherever a width differs from the model-wide one."""
    widths = check_widths(widths)
    check_budget(budget, widths)
    if weight_budget is not None:
        check_budget(weight_budget, widths, "weight budget")
    names = [r.name for r in table]
    chosen_in = allocate([{b: r.noise("input", b) for b in widths} for r in table],
                         [r.input_values for r in table], budget)
    if weight_budget is None:
        chosen_w = [config.weight_bits] * len(table)
    else:
        chosen_w = allocate([{b: r.noise("weight", b) for b in widths} for r in table],
                            [r.weights for r in table], weight_budget)
    noise = sum(r.noise("input", bi) + r.noise("weight", bw) for r, bi, bw in zip(table, chosen_in, chosen_w))
    overrides = dict(config.overrides)
    for n, bi, bw in zip(names, chosen_in, chosen_w):
        changes = {"input_bits": bi if bi != config.input_bits else None}
        if weight_budget is not None:   # else a layer's own weight width stays
            changes["weight_bits"] = bw if bw != config.weight_bits else None
        if any(changes.values()) or n in overrides:   # an override's old width gives way too
            ov = replace(overrides.get(n, LayerOverride()), **changes)
            if ov == LayerOverride():
                overrides.pop(n, None)
            else:
                overrides[n] = ov
    return Advice(config.replace(overrides=overrides), dict(zip(names, chosen_in)), dict(zip(names, chosen_w)),
                  _average(chosen_in, [r.input_values for r in table]), _average(chosen_w, [r.weights for r in table]),
                  predicted_sqnr_db(noise))


def _average(bits: list[int], sizes: list[int]) -> float:
    return sum(b * s for b, s in zip(bits, sizes)) / sum(sizes)
