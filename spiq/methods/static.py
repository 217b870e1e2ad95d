"""static-tensor: one static input range per tensor from the BatchNorm statistics (DFQ-style),
without data. Its range rule is SPIQ's, checked there."""
from __future__ import annotations

from spiq.methods.registry import Method, register
from spiq.methods.spiq import RANGE_OPTIONS, data_free_range, law_spec, warm

STATIC_TENSOR = register(Method(
    "static-tensor", "static per-tensor ranges from BN statistics (DFQ-style)",
    data_free=True, int8_graph=True, options=RANGE_OPTIONS, input_range=data_free_range,
    range_spec=law_spec, warm=warm))
