"""What one request of the public app may cost, decided before any work: the recipe fields that
scale work or memory held to the public app's limits (the library's own are far wider), and an
estimate of each request's memory with an admission rule, so that many visitors together stay
within a memory budget however they combine. No Gradio here.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from spiq.config import ConfigError, QuantConfig
from spiq.core.hooks import forward_hooks

# Work-scaling recipe fields, at most: liu-ptq's search at the paper's settings, and the calibration
# images the app has (its examples). The library accepts up to 100,000 for each search option.
PUBLIC_LIMITS = {"search_points": 100, "search_rounds": 20, "search_tokens": 64, "rank_pairs": 64,
                 "calib_images": 32}
# The Advisor's budget slider: 4 to 8 average bits, in steps of a quarter bit.
BUDGET_MIN, BUDGET_MAX, BUDGET_STEP = 4.0, 8.0, 0.25
# In-flight work's estimated memory, at most; the server's own models and caches come on top.
# The Space has 16 GB: 3 GB of work beside a server of ~2-3 GB leaves room for a second copy.
DEFAULT_BUDGET_MB = 3072
# How long a request waits for others' work to end before it is refused as busy.
ADMIT_WAIT_S = 60.0


class ServerBusy(ConfigError):
    """Admitting the request would take in-flight work past the memory budget, after waiting."""


def check_recipe(config: QuantConfig) -> None:
    """Refuse, naming the field, a recipe whose work the public app does not run."""
    for name, top in PUBLIC_LIMITS.items():
        if (value := getattr(config, name)) > top:
            raise ConfigError(f"{name}: the public app runs at most {top}; got {value} (the spiq command line "
                              "runs any value)")


def check_budget(value) -> float:
    """The Advisor's budget as the slider sends it: a number from 4 to 8 in quarter bits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"the budget must be a number of bits, got {type(value).__name__} {str(value)[:40]!r}")
    if not BUDGET_MIN <= value <= BUDGET_MAX or (value / BUDGET_STEP) % 1:
        raise ConfigError(f"the budget must be from {BUDGET_MIN:g} to {BUDGET_MAX:g} bits in steps of "
                          f"{BUDGET_STEP:g}, got {value:g}")
    return float(value)


@dataclass(frozen=True)
class Footprint:
    """A model's memory: its weights, and every layer's output for one image (what a forward pass
    that keeps its activations, as hooks and gradients do, holds per image)."""
    weight_bytes: int
    activation_bytes: int

    def cost(self, images: int, copies: int = 3) -> int:
        """Bytes for work on `images` images at once that makes `copies` weight copies (a
        quantized model's weights, folded weights and a scratch copy)."""
        return copies * self.weight_bytes + images * self.activation_bytes


@torch.no_grad()
def footprint(model: nn.Module, input_shape: tuple[int, int, int]) -> Footprint:
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    total = [0]

    def count(_mod, _args, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = {n: count for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    with forward_hooks(model, leaves):
        model(torch.zeros(1, *input_shape))
    return Footprint(weights, total[0])


def memory_budget() -> int:
    """Bytes of in-flight work admitted at once: SPIQ_MEMORY_BUDGET_MB, or DEFAULT_BUDGET_MB."""
    text = os.environ.get("SPIQ_MEMORY_BUDGET_MB", str(DEFAULT_BUDGET_MB))
    if not text.isdigit() or int(text) < 256:
        raise ValueError(f"SPIQ_MEMORY_BUDGET_MB must be a whole number of MB, at least 256; got {text!r}")
    return int(text) << 20


class Admission:
    """Requests' estimated bytes, admitted while their sum stays within `budget`: a request that
    does not fit waits for others to end, then is refused (ServerBusy). A request larger than the
    whole budget runs alone. Work nested in admitted work (a view quantizing first) is part of the
    outer estimate and is not counted again."""

    def __init__(self, budget: int, wait_s: float = ADMIT_WAIT_S):
        self.budget, self.wait_s = budget, wait_s
        self.in_flight = 0
        self.peak = 0   # the most admitted at once: what a benchmark compares with the budget
        self._cond = threading.Condition()
        self._local = threading.local()

    @contextlib.contextmanager
    def admit(self, cost: int):
        if getattr(self._local, "inside", False):
            yield
            return
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.in_flight and self.in_flight + cost > self.budget:
                if not self._cond.wait(deadline - time.monotonic()):
                    raise ServerBusy(f"the server is busy with other visitors' work ({self.in_flight >> 20} MB "
                                     f"of {self.budget >> 20} MB in flight; this needs {cost >> 20} MB): try "
                                     "again in a minute")
            self.in_flight += cost
            self.peak = max(self.peak, self.in_flight)
        self._local.inside = True
        try:
            yield
        finally:
            self._local.inside = False
            with self._cond:
                self.in_flight -= cost
                self._cond.notify_all()
