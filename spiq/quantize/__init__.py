"""`quantize(model, config)`: the float model's quantized copy, with the report of every decision."""
from spiq.quantize.api import check_config, methods_for, quantize
from spiq.quantize.prepared import Prepared, prepare, quantizable_layers
from spiq.quantize.report import QuantReport, QuantResult

__all__ = ["Prepared", "QuantReport", "QuantResult", "check_config", "methods_for", "prepare", "quantizable_layers", "quantize"]
