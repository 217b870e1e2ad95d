"""Labelled ImageNet folders in the layouts people have, and their images as a torch Dataset.

Four layouts, each label an index into IMAGENET_SYNSETS (the sorted synsets the models predict):
`<synset>_<anything>.jpg` files; `<synset>/` subfolders; the flat validation folder of
`ILSVRC2012_val_*.JPEG` with `LOC_val_solution.csv` (in it or a folder above); and the official
archives `ILSVRC2012_devkit_t12.tar.gz` + `ILSVRC2012_img_val.tar`, read by torchvision.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from spiq.models.data import IMAGENET_SYNSETS, IMAGE_EXTENSIONS, DatasetError, ImageError, Preprocess, open_image

SYNSET_INDEX = {s: i for i, s in enumerate(IMAGENET_SYNSETS)}
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
VAL_TAR = "ILSVRC2012_img_val.tar"
SOLUTION_CSV = "LOC_val_solution.csv"
_VAL_IMAGE = re.compile(r"ILSVRC2012_val_\d+$")
# Kaggle's copy keeps the CSV at the top and the images in ILSVRC/Data/CLS-LOC/val: four up.
_CSV_LEVELS_UP = 4


def label_of(path: Path) -> int | None:
    synset = path.name.split("_", 1)[0]
    return SYNSET_INDEX.get(synset)


def find_images(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """Labelled images of `root`, in a fixed order, in any of the four layouts (module docstring)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    names = set(os.listdir(root))
    if DEVKIT in names or "meta.bin" in names:
        return _devkit_images(root)
    if VAL_TAR in names:
        raise DatasetError(f"{root}: {VAL_TAR} needs {DEVKIT} beside it (its labels are in the devkit)")
    return _folder_images(root)


def _folder_images(root: Path) -> list[tuple[Path, int]]:
    """`<synset>/` subfolders and flat files named by synset or listed in LOC_val_solution.csv."""
    items: list[tuple[Path, int]] = []
    unlabeled: list[str] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name not in SYNSET_INDEX:
            unlabeled.append(d.name + "/")
            continue
        items += [(f, SYNSET_INDEX[d.name]) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    files = [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    solution = _val_solution(root) if any(_VAL_IMAGE.match(f.stem) for f in files) else {}
    for f in files:
        label = solution.get(f.stem) if _VAL_IMAGE.match(f.stem) else label_of(f)
        if label is None:
            unlabeled.append(f.name)
        else:
            items.append((f, label))
    if unlabeled:
        shown = ", ".join(unlabeled[:3]) + (" ..." if len(unlabeled) > 3 else "")
        raise DatasetError(
            f"{root}: {len(unlabeled)} entries carry no ImageNet synset ({shown}); name files "
            f"<synset>_<anything>.jpg (e.g. n01440764_tench.jpg), put them in <synset>/ folders, or list "
            f"ILSVRC2012_val_*.JPEG files in {SOLUTION_CSV}")
    if not items:
        raise DatasetError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items


def _val_solution(root: Path) -> dict[str, int]:
    """ImageId -> label from the LOC_val_solution.csv in `root` or a folder above it."""
    for folder in [root, *root.resolve().parents[:_CSV_LEVELS_UP]]:
        if (folder / SOLUTION_CSV).is_file():
            return _read_solution(folder / SOLUTION_CSV)
    raise DatasetError(f"{root}: its ILSVRC2012_val_*.JPEG images need {SOLUTION_CSV} (columns ImageId,"
                       f"PredictionString) in the folder or up to {_CSV_LEVELS_UP} folders above it; it is not there")


def _read_solution(path: Path) -> dict[str, int]:
    """The first synset of each PredictionString ("n01751748 0 0 100 100 ..."): the image's class."""
    out = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{path}: expected the columns ImageId,PredictionString, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                synset = (row["PredictionString"] or "").split()[:1]
                if not synset or synset[0] not in SYNSET_INDEX:
                    raise DatasetError(f"{path}:{line}: {row['PredictionString']!r} does not start with an ImageNet synset")
                out[row["ImageId"]] = SYNSET_INDEX[synset[0]]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} cannot be read: {exc}") from None
    return out


def _devkit_images(root: Path) -> list[tuple[Path, int]]:
    """The official validation archives, through torchvision.datasets.ImageNet.

    The first use writes meta.bin and extracts val/ beside the archives (torchvision's way). Its
    targets index the synsets present under val/, and the devkit's own IDs follow another order
    still: each image's label goes through its synset (wnid) to ours.
    """
    from torchvision.datasets import ImageNet

    try:
        ds = ImageNet(str(root), split="val")
    except (RuntimeError, OSError) as exc:   # a missing or corrupt archive; a folder it cannot write
        raise DatasetError(f"{root}: the ImageNet archives cannot be read: {exc}") from None
    unknown = sorted(set(ds.wnids) - set(SYNSET_INDEX))
    if unknown:
        raise DatasetError(f"{root}: the devkit names synsets that are not ImageNet-1k classes ({', '.join(unknown[:3])})")
    items = [(Path(path), SYNSET_INDEX[ds.wnids[target]]) for path, target in ds.samples]
    if not items:
        raise DatasetError(f"{root}: the validation archive holds no images")
    return items


def load_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """One preprocessed image; ImageError with the path in front of the reason."""
    try:
        return preprocess(open_image(path))
    except ImageError as exc:
        reason = str(exc).removeprefix(f"{path}: ")   # not twice, should open_image name it too
        raise ImageError(f"{path}: {reason}") from None
    except OSError as exc:   # a dangling link or an unreadable entry of the folder
        raise ImageError(f"{path}: {exc.strerror or exc}") from None


class LabelledImages(Dataset):
    """(path, label) items decoded and preprocessed on demand: (image or None, label, index, error).

    An unreadable image comes back as its error message, not raised: in a DataLoader worker an
    exception would reach the main process as a traceback, and skipping is the caller's choice.
    """

    def __init__(self, items: list[tuple[Path, int]], preprocess: Preprocess):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            return load_image(path, self.preprocess), label, i, None
        except ImageError as exc:
            return None, label, i, str(exc)


class Batch(NamedTuple):
    images: torch.Tensor   # (n, 3, H, W) of the images that decoded
    labels: torch.Tensor
    indices: torch.Tensor   # their positions in the dataset
    failed: list[tuple[int, str]]   # (position, message) of those that did not


def collate(samples) -> Batch:
    good = [s for s in samples if s[3] is None]
    images = torch.stack([s[0] for s in good]) if good else torch.zeros(0)
    return Batch(images, torch.tensor([s[1] for s in good], dtype=torch.long),
                 torch.tensor([s[2] for s in good], dtype=torch.long), [(s[2], s[3]) for s in samples if s[3] is not None])


def image_batches(items: list[tuple[Path, int]], preprocess: Preprocess, batch_size: int = 32, workers: int = 0,
                  on_skip: Callable[[Path, ImageError], None] | None = None,
                  pin_memory: bool = False) -> Iterator[Batch]:
    """The items decoded in batches, in order, by `workers` DataLoader processes (0: this one).

    An image that does not decode raises ImageError naming it; given `on_skip`, it is left out of
    its batch and passed to on_skip(path, error), here in the calling process whatever decoded it.
    """
    loader = DataLoader(LabelledImages(items, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory, persistent_workers=False)
    for batch in loader:
        for i, message in batch.failed:
            if on_skip is None:
                raise ImageError(message)
            on_skip(items[i][0], ImageError(message))
        yield batch
