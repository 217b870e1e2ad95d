"""Images distilled from a network's own BatchNorm statistics (ZeroQ, Cai et al., CVPR 2020).

Random inputs are optimised until the batch statistics that every BatchNorm sees match its running
mean and variance, within the range of the normalised image. No real image is involved, so what
is fitted on them stays data-free. They stand in for images where a step needs whole forward
passes through the network, which the laws of `ranges` cannot give: the sequential bias
correction of `quantize` (`QuantConfig.bias_images`).

Distilling is slow on a CPU (about 20 s per image for EfficientNet-Lite0 on 2 cores), so the
result is cached on disk per model (a checksum of its weights) and per setting, as what it is: RGB
images, 8-bit PNGs, one folder per model and setting (no pickle to load; the bias fit gains the
same from them as from float32 images). The images of the embedded EfficientNet-Lite0/1/2 ship
with the package (`spiq/quantize/distilled/`), so their first quantization does not pay for them.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from spiq.config import ConfigError
from spiq.core.hooks import forward_hooks

STEPS = 300


SHIPPED = Path(__file__).parent / "distilled"


def cache_dir() -> Path:
    return Path(os.environ.get("SPIQ_CACHE", Path.home() / ".cache" / "spiq")) / "distilled"


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def batchnorm_gap(bn: nn.BatchNorm2d, a: torch.Tensor) -> torch.Tensor:
    """How far a batch `a` entering `bn` is from its running statistics: the RMS over channels of
    the gap in mean plus that in variance, so each layer weighs the same whatever its width."""
    return ((a.mean((0, 2, 3)) - bn.running_mean).pow(2).mean().sqrt()
            + (a.var((0, 2, 3), unbiased=False) - bn.running_var).pow(2).mean().sqrt())


def distill_images(model: nn.Module, n: int, input_lo: torch.Tensor, input_hi: torch.Tensor, size: int = 224,
                   steps: int = STEPS, seed: int = 0,
                   progress: Callable[[float, str], None] | None = None) -> torch.Tensor:
    """n images (n, 3, size, size) whose BatchNorm batch statistics match the running ones.

    `model` is run on a private copy (its BatchNorms in eval mode), so the shared model is never
    touched. The loss is the sum of `batchnorm_gap` over every BN.
    """
    if not has_batchnorm(model):
        raise ConfigError(f"{type(model).__name__} has no BatchNorm2d to distill images from")
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = input_lo.view(1, -1, 1, 1).float(), input_hi.view(1, -1, 1, 1).float()
    # start at noise around the middle of the image range, a quarter of its width wide
    x = ((lo + hi) / 2 + (hi - lo) / 4 * torch.randn(n, lo.shape[1], size, size, generator=gen))
    x = torch.minimum(torch.maximum(x, lo), hi).requires_grad_(True)
    gaps: list[torch.Tensor] = []

    def hook(bn, args, _out):
        gaps.append(batchnorm_gap(bn, args[0]))

    bns = {name: hook for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    opt = torch.optim.Adam([x], lr=0.05)
    # callers such as quantize() run under no_grad
    with forward_hooks(net, bns), torch.enable_grad():
        for step in range(steps):
            gaps.clear()
            net(x)
            loss = torch.stack(gaps).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.minimum(torch.maximum(x, lo), hi))
            if progress is not None:
                progress((step + 1) / steps, f"distilling {n} images from BatchNorm statistics")
    return x.detach()


def image_key(model: nn.Module, n: int, input_lo: torch.Tensor, input_hi: torch.Tensor, size: int = 224,
              steps: int = STEPS) -> str:
    """The folder name of these images in the cache and among the shipped ones."""
    from spiq.core.metrics import parameter_checksum

    return hashlib.sha256(f"{parameter_checksum(model)} {n} {size} {steps} "
                          f"{input_lo.tolist()} {input_hi.tolist()}".encode()).hexdigest()[:24]


def to_pixels(x: torch.Tensor, input_lo: torch.Tensor, input_hi: torch.Tensor) -> torch.Tensor:
    """Normalised images (n, C, H, W) within the bounds as 8-bit pixels, the bounds mapped to 0 and 255."""
    lo, hi = input_lo.view(1, -1, 1, 1), input_hi.view(1, -1, 1, 1)
    return torch.round((x - lo) / (hi - lo) * 255).clamp(0, 255).to(torch.uint8)


def from_pixels(pixels: torch.Tensor, input_lo: torch.Tensor, input_hi: torch.Tensor) -> torch.Tensor:
    lo, hi = input_lo.view(1, -1, 1, 1), input_hi.view(1, -1, 1, 1)
    return pixels.float() / 255 * (hi - lo) + lo


def read_pixels(folder: Path, n: int, size: int) -> torch.Tensor | None:
    """The n RGB images `0.png`... of `folder` as (n, 3, size, size) uint8, or None if any is missing,
    damaged or of another size."""
    images = []
    for i in range(n):
        try:
            with Image.open(folder / f"{i}.png") as im:
                if im.format != "PNG" or im.mode != "RGB" or im.size != (size, size):
                    return None
                images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        except (OSError, ValueError):
            return None
    return torch.stack(images)


def write_pixels(folder: Path, pixels: torch.Tensor) -> None:
    """Write (n, 3, H, W) uint8 images as `folder`/0.png...; the folder appears whole or not at all."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p.permute(1, 2, 0).contiguous().numpy(), "RGB").save(tmp / f"{i}.png")
    try:
        tmp.replace(folder)
    except OSError:   # made meanwhile by another process (or a damaged one is in the way)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)


def find_distilled(model: nn.Module, n: int, input_lo: torch.Tensor, input_hi: torch.Tensor, size: int = 224,
                   steps: int = STEPS) -> torch.Tensor | None:
    """These images if the package ships them or the cache holds them, else None."""
    if input_lo.numel() != 3:
        return None
    key = image_key(model, n, input_lo, input_hi, size, steps)
    for folder in (SHIPPED / key, cache_dir() / key):
        pixels = read_pixels(folder, n, size)
        if pixels is not None:
            return from_pixels(pixels, input_lo, input_hi)
    return None


def distilled_images(model: nn.Module, n: int, input_lo: torch.Tensor, input_hi: torch.Tensor, size: int = 224,
                     steps: int = STEPS, progress: Callable[[float, str], None] | None = None) -> torch.Tensor:
    """`distill_images` on the 8-bit pixel grid, made once per model and setting and then read from
    the disk cache (or the package). Rounded whether or not it can be cached, so that a model gets
    the same images on every run."""
    x = find_distilled(model, n, input_lo, input_hi, size, steps)
    if x is not None:
        return x
    x = distill_images(model, n, input_lo, input_hi, size, steps, progress=progress)
    if input_lo.numel() != 3:   # not an RGB image: kept in memory only
        return x
    pixels = to_pixels(x, input_lo, input_hi)
    try:
        write_pixels(cache_dir() / image_key(model, n, input_lo, input_hi, size, steps), pixels)
    except OSError:   # a read-only home: the images still serve this process
        pass
    return from_pixels(pixels, input_lo, input_hi)
