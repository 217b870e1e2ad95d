"""dynamic-tensor, dynamic-channel: input ranges computed per sample at run time."""
from __future__ import annotations

from spiq.methods.registry import LayerInput, Method, register


def per_sample(x: LayerInput) -> None:
    """No static range: the input is quantized over its own values, sample by sample."""
    return None


DYNAMIC_TENSOR = register(Method("dynamic-tensor", "per-sample per-tensor ranges computed at run time",
                                 input_range=per_sample))
DYNAMIC_CHANNEL = register(Method("dynamic-channel", "per-sample per-channel ranges computed at run time",
                                  input_granularity="channel", input_range=per_sample))
