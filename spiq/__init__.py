"""SPIQ Explorer: data-free post-training quantization of vision networks."""
from spiq.config import METHODS, ConfigError, LayerOverride, QuantConfig
from spiq.models.data import DatasetError, ImageError
from spiq.export import ExportError, ExportReport, export_onnx
from spiq.quantize.api import quantize
from spiq.quantize.report import QuantPlan, QuantResult
from spiq.models.registry import LoadedModel, ModelUnavailableError, availability, list_models, load_model

__all__ = ["load_model", "LoadedModel", "list_models", "availability", "quantize", "QuantResult", "QuantPlan",
           "QuantConfig", "LayerOverride", "METHODS", "ConfigError", "ModelUnavailableError", "ImageError", "DatasetError",
           "export_onnx", "ExportReport", "ExportError"]
