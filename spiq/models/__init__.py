"""Pretrained classifiers by name (registry), images in and tensors out (data), transformer taps (vit)."""
from spiq.models.registry import LoadedModel, ModelUnavailableError, availability, get_spec, list_models, load_model

__all__ = ["LoadedModel", "ModelUnavailableError", "availability", "get_spec", "list_models", "load_model"]
