"""Which methods and configs can quantize a model: checked before any work."""
from __future__ import annotations

from torch import nn

from spiq.config import ConfigError, QuantConfig
from spiq.methods.registry import METHODS, get_method, validate
from spiq.models.vit import vit_graph
from spiq.quantize.memo import quantizable_layers


def methods_for(model: nn.Module) -> list[str]:
    """The methods that apply to `model` (the transformer-only ones to vision transformers only)."""
    return [n for n, m in METHODS.items() if not m.transformer_only or vit_graph(model) is not None]


def check_config(model: nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError if `config` cannot quantize `model`: an option its method refuses, an
    override naming a layer the model does not have, or a method (model-wide or per layer) that
    does not apply to it."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    validate(config)
    config.check_layers(quantizable_layers(model))
    transformer_only = sorted(n for n in config.methods_named() if get_method(n).transformer_only)
    if transformer_only and vit_graph(model) is None:
        raise ConfigError(f"method {transformer_only[0]!r} is for vision transformers; "
                          f"{type(model).__name__} is not one")
