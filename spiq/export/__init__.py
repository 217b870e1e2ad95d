"""The quantized model as an int8 ONNX graph for ONNX Runtime, and running it (runtime)."""
from spiq.export.onnx import ExportError, ExportReport, check_exportable, export_onnx, int8_twin

__all__ = ["ExportError", "ExportReport", "check_exportable", "export_onnx", "int8_twin"]
