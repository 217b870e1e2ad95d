"""What the int8 export can write: its error, and the check of a recipe before any work."""
from __future__ import annotations

from spiq.core.errors import SpiqError
from spiq.methods.registry import METHODS, get_method

SUPPORTED = ("Conv2d, Linear, ReLU, ReLU6, SiLU, Hardswish, GELU, Sigmoid, Tanh, Hardsigmoid, residual add, "
             "global average pool, max pool, flatten, Identity/Dropout")
NO_VIT = "int8 ONNX export handles convolutional networks; vision transformers are not exported yet"


class ExportError(SpiqError, ValueError):
    """The model or its quantization has no int8 ONNX form. Nothing was written."""


def check_exportable(config) -> None:
    """Raise ExportError if the recipe `config` quantizes a layer in a way the int8 graph cannot run.

    Decided on the recipe alone, so that a caller can refuse before quantizing; export_onnx checks
    the config a quantized model carries with it, then each quantized layer itself.
    """
    if get_method(config.method).transformer_only:
        raise ExportError(NO_VIT)
    layers = [("", config.method, config.input_bits, config.weight_bits)]
    layers += [(f"overrides[{name!r}]: ", ov.method or config.method, ov.input_bits or config.input_bits,
                ov.weight_bits or config.weight_bits) for name, ov in config.overrides.items() if not ov.skip]
    for where, method, abits, wbits in layers:
        if not get_method(method).int8_graph:
            static = ", ".join(m.name for m in METHODS.values() if m.int8_graph)
            raise ExportError(f"{where}method={method!r}: dynamic input quantization has no static int8 graph; "
                              f"export a static method ({static})")
        if abits != 8:
            raise ExportError(f"{where}input_bits={abits}: the int8 export needs 8-bit inputs (ONNX Runtime's "
                              "integer kernels take uint8 activations and saturate at 255)")
        if wbits > 8:
            raise ExportError(f"{where}weight_bits={wbits}: the int8 export holds weights of at most 8 bits")
