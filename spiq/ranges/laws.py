"""Range estimation: what values does each conv/linear input take, per channel?

Data-free: every tensor of the graph is described by a per-channel distribution that starts at
the BatchNorm statistics of the layer that produced it (BN output ~ beta_c + |gamma_c| * Z) and is
carried through activations, residual adds, multiplications and pooling. Z is a standardised
law with chosen tails; the distribution is held as a fixed grid of weighted quantiles of Z pushed
through the activations, so ReLU6, SiLU or Hardswish are exact, not approximated. Hard bounds
(ReLU6 caps, the input normalisation, interval arithmetic through the weights) travel alongside
and clamp it.

From such a distribution, `clip_range` picks the quantization range that minimises the expected
clipping + rounding error at the bit width in use. Calibrated observers (min/max, percentile,
MSE on real images) give the same `Range` type, so every method shares the quantized layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from spiq.transforms.fold import BNStats
from spiq.graph.ops import ACT, ADD, GLOBAL_POOL, MAXPOOL, MUL, PASSTHROUGH, POOL, RELU, ChannelReLU6, op_kind
from spiq.graph.trace import ModelGraph
from spiq.config import TAIL_MODELS
from spiq.core.hooks import run_with_hooks
from spiq.core.quant import Grid, fake_quant
from spiq.core.tensors import Range, broadcast_input



@functools.lru_cache(maxsize=None)
def _z_grid(tail: str, k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles of a unit-variance law and their probability weights, dense in the tails."""
    from scipy import stats

    edges = 1.0 / (1.0 + np.exp(-np.linspace(-16.0, 16.0, k + 1)))  # tail mass down to 1e-7
    edges[0], edges[-1] = 0.0, 1.0
    u = 1.0 / (1.0 + np.exp(-np.linspace(-16.0, 16.0, 2 * k + 1)[1::2]))
    if tail == "gauss":
        z = stats.norm.ppf(u)
    elif tail == "laplace":
        z = stats.laplace.ppf(u, scale=1 / np.sqrt(2))
    elif tail.startswith("t") and tail[1:].isdigit():
        nu = int(tail[1:])
        z = stats.t.ppf(u, nu) * np.sqrt((nu - 2) / nu)
    else:
        raise ValueError(f"unknown tail model {tail!r}; choose one of {TAIL_MODELS}")
    # on the CPU whatever the default device: the cache outlives it, Dist.samples moves them to the law's
    return (torch.tensor(z, dtype=torch.float32, device="cpu"),
            torch.tensor(np.diff(edges), dtype=torch.float32, device="cpu"))


def _uniform_quantiles(k: int = 1024) -> torch.Tensor:
    """The probabilities at which `_z_grid` sits, so a known law can share its weights."""
    return torch.tensor(1.0 / (1.0 + np.exp(-np.linspace(-16.0, 16.0, 2 * k + 1)[1::2])), dtype=torch.float32,
                        device="cpu")


@dataclass
class Dist:
    """Per-channel law of a tensor: act(mean + std * Z), clamped to [lo, hi]."""
    mean: torch.Tensor                      # (C,) of the underlying pre-activation variable
    std: torch.Tensor                       # (C,)
    lo: torch.Tensor                        # (C,) hard bounds
    hi: torch.Tensor
    acts: tuple[Callable, ...] = ()
    tail: str = "t4"                        # law of Z
    exact_samples: torch.Tensor | None = None  # (C, K) when the law is known directly (the input)
    # The bounds are the range to use as they are: the normalised image, whose saturated pixels
    # (0 and 255 are common) must not be clipped.
    use_bounds: bool = False

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted samples (C, K) of the law and their weights (K,), shared by every law."""
        z, w = (t.to(self.mean.device) for t in _z_grid(self.tail))
        if self.exact_samples is not None:
            x = self.exact_samples
        else:
            x = self.mean[:, None] + self.std[:, None] * z[None, :]
            for act in self.acts:
                x = act(x)
        return torch.minimum(torch.maximum(x, self.lo[:, None]), self.hi[:, None]), w

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = self.samples()
        m = (x * w).sum(1)
        return m, ((x - m[:, None]) ** 2 * w).sum(1).clamp_min(0).sqrt()


# --- propagation through the graph ------------------------------------------------------------

_INF = torch.tensor(float("inf"))


def _act_bounds(mod_or_fn, lo, hi):
    """Hard bounds after an activation: the function at the ends plus any interior minimum."""
    f = mod_or_fn
    a, b = f(lo), f(hi)
    low = torch.minimum(a, b)
    # SiLU / Hardswish / GELU dip below zero between the ends.
    mins = {nn.SiLU: -0.2785, nn.Hardswish: -0.375, nn.GELU: -0.17}
    for t, m in mins.items():
        if isinstance(f, t):
            low = torch.where((lo < 0) & (hi > -3), torch.minimum(low, torch.full_like(low, m)), low)
    return low, torch.maximum(a, b)


# Kinds whose output keeps its input's law. Pooling narrows a distribution; keeping it whole is
# the safe side.
_CARRIED = PASSTHROUGH | {GLOBAL_POOL, POOL, MAXPOOL}


@dataclass
class Propagation:
    """The data-free law at every conv/linear input, and the layers where it had to guess."""
    inputs: dict[str, Dist] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)


def _weight_bounds(mod: nn.Module, d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval arithmetic through a conv/linear: the widest output any input in bounds allows."""
    w = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else w.new_zeros(w.shape[0])
    lo, hi = d.lo.clamp_min(-1e6), d.hi.clamp_max(1e6)
    if isinstance(mod, nn.Conv2d) and (type(mod) is not nn.Conv2d or any(
            mod.padding if isinstance(mod.padding, tuple) else (1,))):
        # zero padding (or timm's "same" padding) can put a 0 at any tap, inside [lo, hi] or not
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    g = getattr(mod, "groups", 1)
    a, c = w * broadcast_input(lo, w, g), w * broadcast_input(hi, w, g)
    return torch.minimum(a, c).flatten(1).sum(1) + b, torch.maximum(a, c).flatten(1).sum(1) + b


def moment_layer(mod: nn.Module, d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a conv/linear output with no BN after it, inputs taken as independent."""
    m, s = d.moments()
    w = mod.weight.detach()
    bias = mod.bias.detach() if mod.bias is not None else w.new_zeros(w.shape[0])
    g = getattr(mod, "groups", 1)
    if w.dim() == 2:
        return w @ m + bias, ((w ** 2) @ (s ** 2)).sqrt()
    mean = (w.sum((2, 3)) * broadcast_input(m, w, g)[:, :, 0, 0]).sum(1) + bias
    var = ((w ** 2).sum((2, 3)) * broadcast_input(s ** 2, w, g)[:, :, 0, 0]).sum(1)
    return mean, var.sqrt()


def unknown_input_dist(channels: int, tail: str) -> Dist:
    """The stated default for an input whose producer the analysis cannot model: zero mean, unit
    variance, unbounded (reported as a fallback wherever it is used)."""
    inf = torch.full((channels,), float("inf"))
    return Dist(torch.zeros(channels), torch.ones(channels), -inf, inf, tail=tail)


def image_dist(input_lo: torch.Tensor, input_hi: torch.Tensor, tail: str = "t4") -> Dist:
    """The law of the normalised image: pixels taken as uniform between the bounds."""
    lo, hi = input_lo.float(), input_hi.float()
    t = _uniform_quantiles(_z_grid(tail)[0].numel())
    return Dist(mean=(lo + hi) / 2, std=(hi - lo) / np.sqrt(12), lo=lo, hi=hi,
                exact_samples=lo[:, None] + (hi - lo)[:, None] * t[None, :], use_bounds=True)


def propagate(graph: ModelGraph, bn_stats: dict[str, BNStats], input_lo: torch.Tensor,
              input_hi: torch.Tensor, tail: str = "t4", tail_depthwise: str | None = None,
              tail_sum: str | None = None) -> Propagation:
    """Walk the (BN-folded) graph once, carrying a `Dist` per tensor; record each layer's input."""
    gm = graph.gm
    out: dict[fx.Node, Dist | None] = {}
    result = Propagation()
    layer_of = {layer.node: name for name, layer in graph.layers.items()}

    def arg(n):
        return out.get(n) if isinstance(n, fx.Node) else None

    for node in gm.graph.nodes:
        d: Dist | None = None
        if node.op == "placeholder":
            d = image_dist(input_lo, input_hi, tail)
        elif node in layer_of:
            name = layer_of[node]
            mod = gm.get_submodule(node.target)
            src = arg(node.args[0])
            if src is None:
                result.fallbacks[name] = "input produced by an operation the analysis does not model"
                d_in = None
            else:
                d_in = src
                result.inputs[name] = src
            if name in bn_stats:
                st = bn_stats[name]
                lo, hi = (_weight_bounds(mod, d_in) if d_in is not None
                          else (-_INF.expand_as(st.mean), _INF.expand_as(st.mean)))
                # Depthwise outputs are heavier-tailed than what BN statistics of other convs imply.
                dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
                d = Dist(st.mean.clone(), st.std.clone(), lo, hi, tail=(tail_depthwise or tail) if dw else tail)
            elif d_in is not None:
                mean, std = moment_layer(mod, d_in)
                lo, hi = _weight_bounds(mod, d_in)
                d = Dist(mean, std, lo, hi, tail=tail)
        else:
            d = _through(gm, node, op_kind(gm, node), arg, tail_sum or tail, tail)
        out[node] = d
    for name in graph.layers:
        if name not in result.inputs and name not in result.fallbacks:
            result.fallbacks[name] = "input produced by an operation the analysis does not model"
    return result


def _through(gm: fx.GraphModule, node: fx.Node, kind: str | None, arg, tail_sum: str, tail: str) -> Dist | None:
    """The law of a node other than a layer, from its inputs' laws; None where it is not modelled."""
    a = arg(node.args[0]) if node.args else None
    b = arg(node.args[1]) if len(node.args) > 1 else None
    if a is None:
        return None
    if kind in (RELU, ACT):
        # a module runs on the law's (C, K) samples as it is; a functional activation is not modelled
        return _activated(a, gm.get_submodule(node.target)) if node.op == "call_module" else None
    if kind in _CARRIED:
        return a
    if kind == ADD and b is not None and a.channels == b.channels:
        ma, sa = a.moments()
        mb, sb = b.moments()
        return Dist(ma + mb, torch.sqrt(sa ** 2 + sb ** 2), a.lo + b.lo, a.hi + b.hi, tail=tail_sum)
    if kind == MUL and b is not None:
        ma, sa = a.moments()
        mb, sb = b.moments()
        if ma.numel() != mb.numel():
            ma, sa, mb, sb = (t.expand(max(ma.numel(), mb.numel())) for t in (ma, sa, mb, sb))
        var = (sa ** 2 + ma ** 2) * (sb ** 2 + mb ** 2) - (ma * mb) ** 2
        ends = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]).nan_to_num(0.0)
        return Dist(ma * mb, var.clamp_min(0).sqrt(), ends.min(0).values, ends.max(0).values, tail=tail)
    return None


def _activated(d: Dist, act: nn.Module) -> Dist:
    fn = act.on_channels if isinstance(act, ChannelReLU6) else act   # laws are (C, K)
    lo, hi = _act_bounds(fn, d.lo, d.hi)
    if d.exact_samples is not None:
        return Dist(d.mean, d.std, lo, hi, tail=d.tail, exact_samples=fn(d.exact_samples))
    return Dist(d.mean, d.std, lo, hi, d.acts + (fn,), tail=d.tail)


# --- choosing a range from a law ----------------------------------------------------------------

class _SortedSamples:
    """Prefix sums of sorted weighted samples: the expected error of any grid in O(log K)."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        xs, idx = x.double().sort(1)
        ws = w.double().expand_as(xs).gather(1, idx)
        zero = xs.new_zeros(xs.shape[0], 1)
        self.xs = xs.contiguous()
        self.c = [torch.cat([zero, (ws * xs ** k).cumsum(1)], 1) for k in range(3)]

    def _below(self, t, right):
        i = torch.searchsorted(self.xs, t, right=right)
        return [c.gather(1, i) for c in self.c]

    def error(self, lo, hi, levels, clip_penalty):
        """E[(q(x) - x)^2] for grids [lo, hi]: clipping on both sides plus rounding inside.

        lo and hi are (C, n) or (C, 1): the side held fixed during a search is looked up once.
        """
        lo, hi = lo.double().contiguous(), hi.double().contiguous()
        tot = [c[:, -1:] for c in self.c]
        b0, b1, b2 = self._below(lo, right=False)            # x < lo
        a0, a1, a2 = (t - u for t, u in zip(tot, self._below(hi, right=True)))   # x > hi
        lower = b2 - 2 * lo * b1 + lo ** 2 * b0
        upper = a2 - 2 * hi * a1 + hi ** 2 * a0
        # Values exactly on the grid's ends (ReLU zeros, ReLU6 caps) are represented without error.
        inside = self._count_below(hi, right=False) - self._count_below(lo, right=True)
        step = (hi - lo) / levels
        return clip_penalty * (lower + upper) + inside * step ** 2 / 12

    def _count_below(self, t, right):
        return self.c[0].gather(1, torch.searchsorted(self.xs, t, right=right))


def sorted_samples(d: Dist) -> _SortedSamples:
    """The law's prefix sums: half the cost of a range search, the same for every bit width."""
    return _SortedSamples(*d.samples())


def clip_range(d: Dist, bits: int, per_channel: bool, clip_penalty: float = 1.0,
               sums: _SortedSamples | None = None) -> Range:
    """The range minimising the expected quantization error of `d` at `bits` (per channel or tensor)."""
    if d.use_bounds:
        lo, hi = d.lo.clamp_max(0), d.hi.clamp_min(0)
        return Range(lo, hi) if per_channel else Range(lo.min(), hi.max())
    x, w = d.samples()
    return clip_samples(x, w, bits, per_channel, clip_penalty, sums=sums)


def sigma_range(d: Dist, n: float, per_channel: bool) -> Range:
    """The naive rule kept for comparison: [act(mean - n·std), act(mean + n·std)], whatever the bits."""
    if d.use_bounds or d.exact_samples is not None:
        x, _ = d.samples()
        lo, hi = x.min(1).values, x.max(1).values
    else:
        ends = torch.stack([d.mean - n * d.std, d.mean + n * d.std])
        for act in d.acts:
            ends = act(ends)
        lo, hi = ends.min(0).values, ends.max(0).values
    lo = torch.maximum(lo, d.lo).clamp_max(0)
    hi = torch.minimum(hi, d.hi).clamp_min(0)
    hi = torch.where(hi - lo <= 1e-8, lo + 1e-8, hi)
    return Range(lo, hi) if per_channel else Range(lo.min(), hi.max())


def clip_samples(x: torch.Tensor, w: torch.Tensor, bits: int, per_channel: bool,
                 clip_penalty: float = 1.0, n_candidates: int = 96, sums: _SortedSamples | None = None) -> Range:
    """Range search over weighted samples x (C, K), weights w (K,) (`sums`: their prefix sums, if known)."""
    levels = Grid.UNSIGNED.levels(bits)[1]
    x_lo = x.min(1).values.clamp_max(0)
    x_hi = x.max(1).values.clamp_min(0)
    r = torch.logspace(-2.5, 0, n_candidates, device=x.device)
    sums = sums or _SortedSamples(x, w)
    if not per_channel:
        x_lo, x_hi = x_lo.min().expand(1), x_hi.max().expand(1)
    lo, hi = x_lo.clone(), x_hi.clone()
    one_sided = bool((x_lo == 0).all())
    for rnd in range(2):  # coordinate descent: the two tails barely interact
        if rnd and one_sided:
            break  # lo never moves, so a second pass would repeat the first
        for side in ("hi", "lo"):
            if side == "lo" and one_sided:
                continue
            cand = (x_hi if side == "hi" else x_lo)[:, None] * r[None, :]
            other = (lo if side == "hi" else hi)[:, None]
            c_lo, c_hi = (other, cand) if side == "hi" else (cand, other)
            if per_channel:
                err = sums.error(c_lo, c_hi, levels, clip_penalty)
            else:
                n = x.shape[0]
                err = sums.error(c_lo.expand(n, -1), c_hi.expand(n, -1), levels, clip_penalty).sum(0, keepdim=True)
            pick = cand.gather(1, err.argmin(-1, keepdim=True))[:, 0].float()
            if side == "hi":
                hi = pick
            else:
                lo = pick
    # A channel that never moves still needs a valid (non-empty) grid.
    hi = torch.where(hi - lo <= 1e-8, lo + 1e-8, hi)
    if per_channel:
        return Range(lo, hi)
    return Range(lo[0], hi[0])


def quantized_samples(d: Dist, rng: Range, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The law's samples x (C, K), their weights, and q(x) on the grid of `rng` at `bits`."""
    x, w = d.samples()
    lo, hi = (rng.lo, rng.hi) if rng.per_channel else (rng.lo.expand(x.shape[0]), rng.hi.expand(x.shape[0]))
    qmin, qmax = Grid.UNSIGNED.levels(bits)
    step = ((hi - lo) / qmax)[:, None]
    return x, w, fake_quant(x, step, torch.round(-lo[:, None] / step), qmin, qmax, arithmetic="divide")


@dataclass(frozen=True)
class RangeEffect:
    """What quantizing a law on one grid does to it, per channel: E[q(x)] and E[(q(x) - x)^2]."""
    mean_q: torch.Tensor
    err2: torch.Tensor


def range_effect(d: Dist, rng: Range, bits: int) -> RangeEffect:
    """The mean a layer sees through the quantizer (for bias correction) and the error it adds."""
    x, w, xq = quantized_samples(d, rng, bits)
    return RangeEffect((xq * w).sum(1), (((xq - x) ** 2) * w).sum(1))


def law_moments(d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x] and E[x^2] per channel."""
    x, w = d.samples()
    return (x * w).sum(1), ((x ** 2) * w).sum(1)


# --- calibration on real images -----------------------------------------------------------------

@dataclass
class Observed:
    """Per-channel statistics of one layer input over calibration images."""
    lo: torch.Tensor        # (C,) min
    hi: torch.Tensor        # (C,) max
    sample: torch.Tensor    # (C, S) a random subsample of values, for percentile and MSE


@torch.no_grad()
def observe(model: nn.Module, layer_names: list[str], images: torch.Tensor, batch: int = 16,
            keep: int = 4096, seed: int = 0) -> dict[str, Observed]:
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list] = {n: [] for n in layer_names}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach()
            if isinstance(mod, nn.Linear) or x.dim() == 2:  # channels last: tokens (..., C)
                xc = x.reshape(-1, x.shape[-1]).t()
            else:
                xc = x.transpose(0, 1).reshape(x.shape[1], -1)
            mn, mx = xc.min(1).values, xc.max(1).values
            lo[name] = torch.minimum(lo[name], mn) if name in lo else mn
            hi[name] = torch.maximum(hi[name], mx) if name in hi else mx
            # drawn on the generator's CPU, so the subsample is the same whichever device the model is on
            idx = torch.randint(0, xc.shape[1], (min(keep, xc.shape[1]),), generator=gen, device=gen.device)
            acc[name].append(xc[:, idx.to(xc.device)])
        return fn

    run_with_hooks(model, {n: hook(n) for n in layer_names}, images, batch, pre=True)
    return {n: Observed(lo[n], hi[n], torch.cat(acc[n], 1)) for n in layer_names}


def calibrated_range(obs: Observed, rule: str, bits: int, per_channel: bool,
                     percentile: float = 99.99) -> Range:
    if rule == "minmax":
        lo, hi = obs.lo.clamp_max(0), obs.hi.clamp_min(0)
        if not per_channel:
            lo, hi = lo.min(), hi.max()
    elif rule == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100], device=obs.sample.device)
        s = obs.sample if per_channel else obs.sample.reshape(1, -1)
        if s.shape[1] > 2 ** 24 - 1:
            s = s[:, torch.randperm(s.shape[1])[: 2 ** 24 - 1]]
        qs = torch.quantile(s, q, dim=1)
        lo, hi = qs[0].clamp_max(0), qs[1].clamp_min(0)
        if not per_channel:
            lo, hi = lo[0], hi[0]
    elif rule == "mse":
        k = obs.sample.shape[1]
        return clip_samples(obs.sample, obs.sample.new_full((k,), 1.0 / k), bits, per_channel)
    else:
        raise ValueError(f"unknown calibration rule {rule!r}")
    hi = torch.where(hi - lo <= 1e-8, lo + 1e-8, hi)
    return Range(lo, hi)

