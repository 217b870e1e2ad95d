"""The quantization methods by name: what each one is, and what quantize() calls for its layers.

Each module of `spiq.methods` builds its methods and `register`s them; importing the package
imports them all. QuantConfig (spiq.config, a layer below) reads them through `use_methods`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from spiq.config import GRANULARITIES, ConfigError, QuantConfig, suggest, use_methods
from spiq.core.tensors import Range
from spiq.ranges.laws import Dist


class RangeSource(Protocol):
    """A model's data-free ranges, each searched once and kept (spiq.quantize's Prepared)."""

    def data_free_range(self, name: str, dist: Dist, bits: int, per_channel: bool, config: QuantConfig) -> Range:
        ...


@dataclass(frozen=True)
class LayerInput:
    """One quantized input, a layer's or an attention matmul operand's, and what its range is chosen from."""
    name: str
    bits: int
    per_channel: bool
    config: QuantConfig
    dist: Dist | None                 # its data-free law, if known
    prepared: RangeSource
    calibrated: Mapping[str, Range]   # ranges measured on calibration images, by input name
    bounds: Range | None = None       # where it lies whatever the data (the attention map: [0, 1])


def owns_nothing(config: QuantConfig) -> None:
    """The check of a method without options of its own."""


@dataclass(frozen=True)
class Method:
    """One quantization method: its properties, and the functions quantize() calls for it."""
    name: str
    description: str
    input_granularity: str = "tensor"    # where the config leaves it open
    data_free: bool = False              # static ranges from the BatchNorm statistics alone
    needs_calibration: bool = False      # reads calibration images
    transformer_only: bool = False       # applies to vision transformers only
    int8_graph: bool = False             # static ranges that the int8 ONNX graph carries (QuantConfig.int8_graph)
    fold_choice: bool = False            # fold="auto": per layer, folds per-channel scales only where the law says it pays
    options: tuple[str, ...] = ()        # the QuantConfig fields that belong to it
    # The static range of one input; None where the input is quantized per sample at run time.
    input_range: Callable[[LayerInput], Range | None] | None = None
    # What it measures on calibration images for an input of (bits, per_channel): the arguments
    # (rule, bits, per_channel, percentile) of ranges.calibrated_range.
    calibration: Callable[[int, bool, QuantConfig], tuple] | None = None
    # Instead of input_range, one search over the whole model before any layer is quantized:
    # (float model, its VitGraph, calibration images, (weight bits, input bits) of a layer or None,
    # config, memo, progress) -> the plan its layers take their quantizers from.
    search: Callable[..., Any] | None = None
    validate: Callable[[QuantConfig], None] = owns_nothing


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known by its name, to QuantConfig and quantize()."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if (method.input_range is None) == (method.search is None):
        raise ValueError(f"method {method.name!r}: give either input_range or search")
    if method.input_granularity not in GRANULARITIES:
        raise ValueError(f"method {method.name!r}: input_granularity must be one of {', '.join(GRANULARITIES)}")
    if method.fold_choice and not method.data_free:
        raise ValueError(f"method {method.name!r}: the fold choice reads the data-free law of each input")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}{suggest(name, METHODS)}") \
            from None


def validate(config: QuantConfig) -> None:
    """Every method's check of the options it owns, then what the int8 graph needs."""
    for check in dict.fromkeys(m.validate for m in METHODS.values()):
        check(config)
    if config.int8_graph and (not get_method(config.method).int8_graph or config.input_bits != 8
                              or config.weight_bits > 8):
        static = ", ".join(m.name for m in METHODS.values() if m.int8_graph)
        raise ConfigError(f"int8_graph simulates the int8 ONNX graph: it needs a static method ({static}), 8-bit "
                          f"inputs and weights of at most 8 bits; got {config.method!r} "
                          f"W{config.weight_bits}A{config.input_bits}")


use_methods(METHODS, validate)
