"""The quantization methods by name: what each one is, and the handler that plans its layers.

Each module of `spiq.methods` builds its methods and `register`s them; importing the package
imports them all. QuantConfig (spiq.config, a layer below) reads them through `use_methods`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, replace

from spiq.config import GRANULARITIES, ConfigError, QuantConfig, suggest, use_methods
from spiq.core.tensors import Range
from spiq.methods import layerwise
from spiq.methods.plans import LayerInput, MethodPlan, PlanContext


def owns_nothing(config: QuantConfig) -> None:
    """The check of a method without options of its own."""


@dataclass(frozen=True)
class Method:
    """One quantization method: its properties, and the handler that plans its layers.

    `plan(ctx, method)` turns the context of one quantization into the method's `MethodPlan`. A
    method that chooses each input's range on its own gives `input_range` instead and gets the
    layerwise handler (spiq.methods.layerwise): its ranges, weights and bias correction."""
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
    # What a data-free range of (bits, per_channel) is memoised by (spiq.methods.spiq.LawRange).
    range_spec: Callable[[int, bool, QuantConfig], Hashable] | None = None
    # What it measures on calibration images for an input of (bits, per_channel): a spec with
    # `.measure(observed)` (spiq.methods.calibrated.CalibratedRange), measured before planning.
    calibration: Callable[[int, bool, QuantConfig], Hashable] | None = None
    # Its data-free ranges at many bit widths, searched ahead of requests: (memo, input name, its
    # law, config, bits) -> None (spiq.methods.spiq.warm).
    warm: Callable[..., None] | None = None
    # Instead of input_range, a handler of its own: (context, this method) -> its plan.
    plan: Callable[[PlanContext, "Method"], MethodPlan] | None = None
    validate: Callable[[QuantConfig], None] = owns_nothing


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known by its name, to QuantConfig and quantize()."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if (method.input_range is None) == (method.plan in (None, layerwise.plan_layers)):
        raise ValueError(f"method {method.name!r}: give either input_range or plan")
    if method.input_granularity not in GRANULARITIES:
        raise ValueError(f"method {method.name!r}: input_granularity must be one of {', '.join(GRANULARITIES)}")
    if method.fold_choice and method.range_spec is None:
        raise ValueError(f"method {method.name!r}: the fold choice reads the data-free law of each input")
    if method.plan is None:
        method = replace(method, plan=layerwise.plan_layers)
    METHODS[method.name] = method
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """`method` registered for the block only: a test's, or a one-off experiment's."""
    method = register(method)
    try:
        yield method
    finally:
        METHODS.pop(method.name, None)


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
