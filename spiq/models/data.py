"""Images in, tensors out: safe decoding of any image, preprocessing (labelled folders: models.folders)."""
from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spiq.core.errors import SpiqError

IMAGENET_SYNSETS: list[str] = resources.files("spiq.models").joinpath("imagenet_synsets.txt").read_text().split()


def _imagenet_classes() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


IMAGENET_CLASSES: list[str] = _imagenet_classes()

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Far above any real photo, far below what a decompression bomb asks for.
MAX_PIXELS = 40_000_000
# Every way an image arrives (file, upload, data URL, clipboard, webcam) is held to this size before
# it is decoded: a phone photo is under 15 MB.
MAX_IMAGE_BYTES = 25 * 1024 * 1024
# Resizing the short side scales the long one with it: 100000x10 pixels pass the pixel bound and
# resize to 650 Mpx. A side and an aspect bound keep every resize near the crop the model sees.
MAX_SIDE = 16_384
MAX_ASPECT = 20


class ImageError(SpiqError, ValueError):
    """An input that is not a usable image."""


class DatasetError(SpiqError, ValueError):
    """An image folder that cannot be evaluated."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image (greyscale, palette, RGBA, CMYK, 16-bit, EXIF-rotated) as upright 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def check_image_bytes(size: int) -> None:
    """Refuse an encoded image over MAX_IMAGE_BYTES, or an empty one, before it is read."""
    if size == 0:
        raise ImageError("the file is empty (0 bytes)")
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"the file is {_mb(size)}; the limit is {_mb(MAX_IMAGE_BYTES)}")


def check_image_size(w: int, h: int) -> None:
    """Refuse dimensions that would cost far more to decode or resize than a photo does."""
    if w * h > MAX_PIXELS:
        raise ImageError(f"image is too large: {w}x{h} = {w * h / 1e6:.0f} Mpx; the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} Mpx")
    if max(w, h) > MAX_SIDE:
        raise ImageError(f"image is {w}x{h}; no side may exceed {MAX_SIDE} px")
    if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
        raise ImageError(f"image is {w}x{h}; one side may be at most {MAX_ASPECT} times the other")


def _sized_source(source):
    """`source` as something Image.open reads, after its encoded size passed the bound."""
    if isinstance(source, (bytes, bytearray)):
        check_image_bytes(len(source))
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            check_image_bytes(os.path.getsize(source))
        except OSError:
            raise ImageError("the file cannot be read") from None
        return source
    pos = source.tell()
    check_image_bytes(source.seek(0, os.SEEK_END) - pos)
    source.seek(pos)
    return source


def open_image(source) -> Image.Image:
    """Decode a path, bytes or file object into RGB, refusing what is not a sane image.

    Messages never name the file: the caller knows which it gave, and a server must not echo paths."""
    source = _sized_source(source)
    try:
        img = Image.open(source)
        check_image_size(*img.size)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large to decode safely (limit {MAX_PIXELS / 1e6:.0f} Mpx): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image in any format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    return to_rgb(img)


REFUSED_FILE = "this file is not one that was uploaded here"


def allowed_file(path: str | os.PathLike, roots) -> Path | None:
    """`path` resolved (symlinks followed) if it is a regular file inside one of `roots`, else None."""
    try:
        real = Path(os.path.realpath(path))
        return real if real.is_file() and any(real.is_relative_to(os.path.realpath(r)) for r in roots) else None
    except (OSError, ValueError):
        return None


def open_allowed_image(path: str | os.PathLike, roots) -> Image.Image:
    """`open_image` of a path a client named, only if `allowed_file`. A refusal says the same for
    every path, so it tells nothing of what exists."""
    if (real := allowed_file(path, roots)) is None:
        raise ImageError(REFUSED_FILE)
    return open_image(real)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL, refused before decoding when they would exceed MAX_IMAGE_BYTES."""
    head, comma, body = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        raise ImageError("the image data is not a base64 data URL")
    check_image_bytes(len(body) * 3 // 4 - (body.endswith("=") + body.endswith("==")))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL is not valid base64") from None


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, scale to [0, 1], normalise: PIL image -> (3, crop, crop)."""
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        img = to_rgb(img)
        img = F.resize(img, self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = F.center_crop(img, self.crop)
        x = F.pil_to_tensor(img).float().div_(255.0)
        return F.normalize(x, self.mean, self.std)

    def to_image(self, x: torch.Tensor) -> np.ndarray:
        """The picture a preprocessed tensor (3, H, W) shows, as (H, W, 3) uint8: what the model sees."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (x.detach() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (lo, hi) that a normalised pixel can take: the first layer's data-free range."""
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return (0.0 - mean) / std, (1.0 - mean) / std


def load_batch(paths, preprocess: Preprocess) -> torch.Tensor:
    return torch.stack([preprocess(open_image(p)) for p in paths])
