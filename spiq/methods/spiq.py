"""SPIQ (Yvinec et al., WACV 2023): static input ranges per input channel from the BatchNorm
statistics, without data, each channel's scale folded into the weights.

The data-free range of an input, chosen from its BN-implied law at its bit width, is static-tensor's
too (spiq.methods.static), one per tensor there.
"""
from __future__ import annotations

from spiq.config import ConfigError, QuantConfig, check_choice
from spiq.core.tensors import Range
from spiq.methods.registry import LayerInput, Method, register

RANGE_OPTIONS = ("range_rule", "n_sigma", "clip_penalty")


def data_free_range(x: LayerInput) -> Range:
    """The range the input's law gives at its bits (config.range_rule), searched once per model."""
    if x.bounds is not None:
        return x.bounds
    return x.prepared.data_free_range(x.name, x.dist, x.bits, x.per_channel, x.config)


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
    input_range=data_free_range, validate=validate))
