"""SPIQ Explorer: data-free post-training quantization of vision networks."""
from .config import METHODS, ConfigError, LayerOverride, QuantConfig
from .data import DatasetError, ImageError
from .export import ExportError, ExportReport, export_onnx
from .quantize import quantize
from .registry import ModelUnavailableError, availability, list_models, load_model

__all__ = ["load_model", "list_models", "availability", "quantize", "QuantConfig", "LayerOverride",
           "METHODS", "ConfigError", "ModelUnavailableError", "ImageError", "DatasetError",
           "export_onnx", "ExportReport", "ExportError"]
