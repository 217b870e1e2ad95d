"""What quantize() returns: the quantized copy, and the plan it applied, which is its report."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.core.quant import InputQuant
from spiq.methods.plans import LayerPlan
from spiq.models.data import Preprocess
from spiq.ranges.laws import Propagation
from spiq.transforms.fold import EqualizedPair


@dataclass(frozen=True)
class QuantPlan:
    """Everything quantization decided for a model, layer by layer, and why: what `apply` makes
    the quantized copy from, and the report every analysis and the export read. It holds no cache."""
    config: QuantConfig
    layers: Mapping[str, LayerPlan]               # each quantized conv/linear, in model order
    # The BN-folded float model the plan applies to: the reference every analysis compares with.
    reference: nn.Module = field(repr=False)
    matmuls: Mapping[str, InputQuant] = field(default_factory=dict)   # attention matmul operand -> quantizer
    fallbacks: Mapping[str, str] = field(default_factory=dict)   # where the graph analysis had to guess
    propagation: Propagation | None = field(default=None, repr=False)
    preprocess: Preprocess | None = None
    # What a method's whole-model search found, by method (liu-ptq: a LiuPlan: the intervals, the
    # bits mixed precision chose, the attention rank inversions).
    searched: Mapping[str, Any] = field(default_factory=dict, repr=False)
    equalized: tuple[EqualizedPair, ...] = ()
    # bias_images: how many distilled images the biases were fitted on (0: none), and what the fit
    # took from each layer's bias, which the int8 graph carries into the layers it re-quantizes.
    bias_images: int = 0
    bias_fit: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class QuantResult:
    """What quantize() returns: the quantized copy of the model with its plan (`report`).

    Calling it runs the quantized model. `preprocess` is the input normalisation the first layer's
    range was derived from (None: ImageNet mean/std assumed). For `QuantConfig(int8_graph=True)`,
    `model` simulates the int8 graph of `source`, the result the int8 export writes.
    """
    model: nn.Module
    report: QuantPlan
    preprocess: Preprocess | None = None
    source: QuantResult | None = None

    @property
    def config(self) -> QuantConfig:
        return self.report.config

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def module_of(q: QuantResult | nn.Module) -> nn.Module:
    """The module that computes `q`: a quantize() result's model, or `q` itself."""
    return q.model if isinstance(q, QuantResult) else q
