"""`quantize(model, config)`: the float model's quantized copy, with the report of every decision."""
from spiq.quantize.api import Prepared, QuantReport, check_config, methods_for, prepare, quantizable_layers, quantize

__all__ = ["Prepared", "QuantReport", "check_config", "methods_for", "prepare", "quantizable_layers", "quantize"]
