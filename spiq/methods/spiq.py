"""SPIQ (Yvinec et al., WACV 2023): static input ranges per input channel from the BatchNorm
statistics, without data, each channel's scale folded into the weights.

The data-free range of an input, chosen from its BN-implied law at its bit width, is static-tensor's
too (spiq.methods.static), one per tensor there.
"""
from __future__ import annotations

from dataclasses import dataclass

from spiq.config import ConfigError, QuantConfig, check_choice
from spiq.core.tensors import Range
from spiq.methods.layerwise import law_effect, memo_moments
from spiq.methods.plans import LayerInput, Memo
from spiq.methods.registry import Method, register
from spiq.ranges.laws import Dist, clip_range, sigma_range, sorted_samples

RANGE_OPTIONS = ("range_rule", "n_sigma", "clip_penalty")


@dataclass(frozen=True)
class LawRange:
    """A data-free range: the rule that picks it from an input's law, at these bits, per channel
    or per tensor. "mse": the expected clipping (weighted by `penalty`, config.clip_penalty) plus
    rounding error is smallest; "sigma": mean ± `penalty` (config.n_sigma) std, the naive rule."""
    rule: str
    bits: int
    per_channel: bool
    penalty: float

    def of(self, dist: Dist, sums=None) -> Range:
        """The range of `dist` (`sums`: its sorted samples, when several ranges are searched on them)."""
        if self.rule == "mse":
            return clip_range(dist, self.bits, self.per_channel, self.penalty, sums)
        return sigma_range(dist, self.penalty, self.per_channel)


def law_spec(bits: int, per_channel: bool, config: QuantConfig) -> LawRange:
    """The data-free range config's rule asks for at `bits`."""
    penalty = config.clip_penalty if config.range_rule == "mse" else config.n_sigma
    return LawRange(config.range_rule, bits, per_channel, penalty)


def law_range(memo: Memo, name: str, dist: Dist, spec: LawRange, sums=None) -> Range:
    """Input `name`'s range by `spec`, searched once per model."""
    return memo(("range", name, spec), lambda: spec.of(dist, sums))


def data_free_range(x: LayerInput) -> Range:
    """The range the input's law gives at its bits (config.range_rule)."""
    if x.bounds is not None:
        return x.bounds
    return law_range(x.memo, x.name, x.dist, law_spec(x.bits, x.per_channel, x.config))


def warm(memo: Memo, name: str, dist: Dist, config: QuantConfig, bits) -> None:
    """Input `name`'s data-free ranges at each of `bits`, per channel and per tensor, and what they
    do to its law, searched ahead of requests (the law's sorted samples made once for all)."""
    sums = sorted_samples(dist) if config.range_rule == "mse" and not dist.use_bounds else None
    memo_moments(memo, name, dist)
    for b in bits:
        for per_channel in (True, False):
            spec = law_spec(b, per_channel, config)
            law_effect(memo, name, dist, spec, law_range(memo, name, dist, spec, sums), b)


def validate(config: QuantConfig) -> None:
    """The data-free range rule, and how SPIQ folds."""
    check_choice("range_rule", config.range_rule, ("mse", "sigma"))
    check_choice("fold", config.fold, ("auto", "always"))
    n_sigma, penalty = config.n_sigma, config.clip_penalty
    if isinstance(n_sigma, bool) or not isinstance(n_sigma, (int, float)) or not 0 < n_sigma <= 100:
        raise ConfigError(f"n_sigma must be a number in (0, 100], got {n_sigma!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty <= 1000:
        raise ConfigError(f"clip_penalty must be a number in (0, 1000], got {penalty!r}")


SPIQ = register(Method(
    "spiq", "static per-input-channel ranges from BN statistics, scales folded into the weights",
    input_granularity="channel", data_free=True, int8_graph=True, fold_choice=True, options=RANGE_OPTIONS + ("fold",),
    input_range=data_free_range, range_spec=law_spec, warm=warm, validate=validate))
