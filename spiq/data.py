"""Images in, tensors out: safe decoding of any image, preprocessing, labelled image folders."""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_SYNSETS: list[str] = resources.files("spiq").joinpath("imagenet_synsets.txt").read_text().split()
_SYNSET_INDEX = {s: i for i, s in enumerate(IMAGENET_SYNSETS)}


def _imagenet_classes() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


IMAGENET_CLASSES: list[str] = _imagenet_classes()

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Far above any real photo, far below what a decompression bomb asks for.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input that is not a usable image."""


class DatasetError(ValueError):
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


def open_image(source) -> Image.Image:
    """Decode a path, bytes or file object into RGB, refusing what is not a sane image."""
    if isinstance(source, (bytes, bytearray)):
        import io

        if not source:
            raise ImageError("the file is empty (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
        raise ImageError(f"{source}: the file is empty (0 bytes)")
    try:
        img = Image.open(source)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"image is too large: {w}x{h} = {w * h / 1e6:.0f} Mpx; the limit is "
                             f"{MAX_PIXELS / 1e6:.0f} Mpx")
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


def label_of(path: Path) -> int | None:
    synset = path.name.split("_", 1)[0]
    return _SYNSET_INDEX.get(synset)


def find_images(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """Labelled images of `root`: `<synset>_<anything>.jpg` files, or an ImageFolder of synset dirs."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    items: list[tuple[Path, int]] = []
    unlabeled: list[str] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        for d in subdirs:
            if d.name not in _SYNSET_INDEX:
                unlabeled.append(d.name + "/")
                continue
            items += [(f, _SYNSET_INDEX[d.name]) for f in sorted(d.iterdir())
                      if f.suffix.lower() in IMAGE_EXTENSIONS]
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            label = label_of(f)
            if label is None:
                unlabeled.append(f.name)
            else:
                items.append((f, label))
    if unlabeled:
        shown = ", ".join(unlabeled[:3]) + (" ..." if len(unlabeled) > 3 else "")
        raise DatasetError(
            f"{root}: {len(unlabeled)} entries carry no ImageNet synset ({shown}); name files "
            f"<synset>_<anything>.jpg (e.g. n01440764_tench.jpg) or put them in <synset>/ folders")
    if not items:
        raise DatasetError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items


def load_batch(paths, preprocess: Preprocess) -> torch.Tensor:
    return torch.stack([preprocess(open_image(p)) for p in paths])
