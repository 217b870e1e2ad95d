"""What quantize() returns: the quantized copy, and what was decided for it per layer and for the whole model."""
from __future__ import annotations

from dataclasses import dataclass, field
import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.core.tensors import Range
from spiq.models.data import Preprocess
from spiq.methods.liu import LiuPlan
from spiq.quantize.prepared import Prepared
from spiq.ranges.laws import Propagation


@dataclass
class LayerReport:
    method: str
    input_bits: int
    weight_bits: int
    input_per_channel: bool
    range: Range | None           # the static input range, None for dynamic or skipped layers
    data_free_range_from: str     # "bn" (producer statistics) or the fallback used


@dataclass
class QuantReport:
    """What quantize() decided, per layer, and where the graph analysis had to fall back."""
    config: QuantConfig
    layers: dict[str, LayerReport] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    propagation: Propagation | None = None
    # What the model was quantized from: its BN-folded float copy (the reference every analysis
    # compares with) and the data-free ranges searched so far. Shared and read-only.
    prepared: Prepared | None = field(default=None, repr=False)
    # liu-ptq: the searched intervals, the bits mixed precision chose and the attention rank inversions.
    liu: LiuPlan | None = None
    # bias_images: how many distilled images the biases were fitted on (0: none), and what the fit
    # took from each layer's bias, which the int8 graph carries into the layers it re-quantizes.
    bias_images: int = 0
    bias_fit: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def reference(self) -> nn.Module:
        return self.prepared.folded


@dataclass(frozen=True, eq=False)
class QuantResult:
    """What quantize() returns: the quantized copy of the model with its report and config.

    Calling it runs the quantized model. `preprocess` is the input normalisation the first layer's
    range was derived from (None: ImageNet mean/std assumed). For `QuantConfig(int8_graph=True)`,
    `model` simulates the int8 graph of `source`, the result the int8 export writes.
    """
    model: nn.Module
    report: QuantReport
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
