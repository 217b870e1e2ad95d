"""What a method's handler sees and what it decides: the context of one quantization, and an
immutable plan per layer. `spiq.quantize` gathers the layer plans into the model's plan and
applies it; no handler touches a model."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from spiq.config import LayerSettings, QuantConfig
from spiq.core.quant import InputQuant
from spiq.core.tensors import Range
from spiq.models.vit import VitGraph
from spiq.ranges.laws import Dist, Propagation

T = TypeVar("T")


class Memo(Protocol):
    """Work kept across quantizations of one model, keyed by the specs it was made from."""

    def __call__(self, key: Hashable, make: Callable[[], T]) -> T:
        ...

    def weights(self, key: Hashable, make: Callable[[], T]) -> T:
        """As calling it, for quantized weights: big, so only the recently used are kept."""
        ...


@dataclass(frozen=True)
class LayerInput:
    """One quantized input, a layer's or an attention matmul operand's, and what its range is chosen from."""
    name: str
    bits: int
    per_channel: bool
    config: QuantConfig
    dist: Dist | None                 # its data-free law, if known
    memo: Memo
    calibrated: Mapping[str, Range]   # ranges measured on calibration images, by input name
    bounds: Range | None = None       # where it lies whatever the data (the attention map: [0, 1])


@dataclass(frozen=True)
class LayerPlan:
    """What quantization decided for one conv/linear layer, and why."""
    name: str
    method: str
    input_bits: int
    weight_bits: int
    input_quant: InputQuant
    range: Range | None            # the static input range, None for a dynamic input
    weight_codes: torch.Tensor     # integer weights (input scales folded in when `folded`)
    weight_scale: torch.Tensor
    weight: torch.Tensor           # the float weight the simulation computes with
    bias: torch.Tensor | None      # the bias after every correction (None: the layer has none)
    folded: bool                   # per-channel input scales folded into the weights (SPIQ)
    data_free_range_from: str      # "bn" (producer statistics), "calibration", or the fallback used
    reasons: tuple[str, ...] = ()  # every choice made for the layer and every fallback taken
    # E[x̂], the mean of the quantized input under its law, that the bias correction was computed
    # with (None: no law correction): a later change of the weights corrects the bias with it.
    input_mean: torch.Tensor | None = field(default=None, repr=False)

    @property
    def input_per_channel(self) -> bool:
        return self.input_quant.per_channel


@dataclass(frozen=True)
class PlanContext:
    """Everything a method's handler may read to plan its layers; all of it shared and read-only."""
    config: QuantConfig
    settings: Mapping[str, LayerSettings]   # every quantizable layer's
    reference: nn.Module                    # the BN-folded float model (attention written out)
    propagation: Propagation                # data-free laws of the layer inputs
    vit: VitGraph | None
    matmul_laws: Mapping[str, Dist]         # a transformer's attention matmul operands' laws
    calibrated: Mapping[str, Range]         # ranges the methods' calibration specs measured
    observed: Mapping[str, Any]             # what calibration observed at the matmul operands
    calib_data: torch.Tensor | None
    memo: Memo
    fallbacks: Mapping[str, str]
    progress: Callable[[float, str], None] | None = None

    def layers_of(self, method: str) -> list[str]:
        """The layers quantized by `method`, in model order."""
        return [n for n, s in self.settings.items() if s.method == method and not s.skip]


@dataclass(frozen=True)
class MethodPlan:
    """What one method's handler decided: its layers, the attention matmul operands it quantizes
    (site -> quantizer) and anything else it wants reported (liu-ptq's search)."""
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    matmuls: Mapping[str, InputQuant] = field(default_factory=dict)
    extra: Any = None
