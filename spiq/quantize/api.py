"""`quantize(model, config)`: a quantized copy of a float model, `apply(plan(model, config))`; the
original is never touched."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spiq.config import ConfigError, QuantConfig
from spiq.models.data import Preprocess
from spiq.models.registry import LoadedModel
# check_config, methods_for: what can quantize a model, also from here (the public API's)
from spiq.quantize.check import check_config, methods_for  # noqa: F401
from spiq.quantize.memo import Memo
from spiq.quantize.apply import apply
from spiq.quantize.plan import planned
from spiq.quantize.report import QuantResult


@torch.no_grad()
def quantize(model: nn.Module | LoadedModel, config: QuantConfig, calib_data: torch.Tensor | None = None,
             progress: Callable[[float, str], None] | None = None, memo: Memo | None = None, *,
             preprocess: Preprocess | None = None) -> QuantResult:
    """A quantized copy of `model` (eval mode), with its plan as its report; `model` is left as it was.

    `model` is what load_model() returned, or a bare module with its `preprocess` (the input
    normalisation gives the first layer's data-free range; without it ImageNet mean/std is assumed
    and the report says so). `calib_data` (N, 3, H, W) preprocessed images are needed only by the
    calib-* methods and liu-ptq. `memo` is a `Memo(model)` kept from earlier calls, to re-quantize fast.
    """
    decided, applied = planned(model, config, calib_data, progress, memo, preprocess=preprocess)
    result = applied or apply(decided)   # the bias fit applies the plan on its way: not done twice
    return _int8_graph(result) if config.int8_graph else result


# The int8 graph's simulation is built by spiq.export, a layer above this one: it registers its
# builder here when imported (`import spiq` imports it), so quantize() needs no import of it.
_INT8_GRAPH: list[Callable[[QuantResult], QuantResult]] = []


def register_int8_graph(build: Callable[[QuantResult], QuantResult]) -> None:
    """What QuantConfig(int8_graph=True) applies to the quantized result (raises ConfigError)."""
    _INT8_GRAPH[:] = [build]


def _int8_graph(q: QuantResult) -> QuantResult:
    if not _INT8_GRAPH:
        raise ConfigError("int8_graph needs spiq.export (import spiq)")
    return _INT8_GRAPH[0](q)
