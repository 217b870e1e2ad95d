"""Small labelled folders in each ImageNet layout spiq reads, built from the same images, so that a
test can check every layout gives each image the same label.

The devkit's own class IDs (ILSVRC2012_ID) follow WordNet's tree, not the sorted synsets, and
torchvision's targets count only the synsets present: the three synsets here sit at 1, 812 and
999 of the sorted list, with devkit IDs 3, 2, 1, so a label taken from either index is wrong.
"""
from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from spiq.models.folders import DEVKIT, SOLUTION_CSV, SYNSET_INDEX, VAL_TAR

# wnid -> devkit ILSVRC2012_ID, as the real devkit numbers them: not in sorted order
DEVKIT_IDS = {"n15075141": 1, "n04266014": 2, "n01443537": 3}
# the validation images, in ILSVRC2012_val_* order, and the synset of each
VAL_SYNSETS = ["n04266014", "n01443537", "n15075141", "n01443537", "n15075141", "n04266014"]
LAYOUTS = ("synset-files", "synset-folders", "val-csv", "devkit")


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def expected_labels() -> dict[str, int]:
    """ILSVRC2012_val_* stem -> index into IMAGENET_SYNSETS."""
    return {val_name(i): SYNSET_INDEX[s] for i, s in enumerate(VAL_SYNSETS)}


def image_bytes(i: int, source: Path | None = None) -> bytes:
    """A JPEG: `source` re-encoded, or a small picture of its own per i."""
    img = Image.open(source).convert("RGB") if source else Image.fromarray(
        np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(layout: str, root: Path, sources: list[Path] | None = None) -> Path:
    """The folder to give find_images for `layout`, built under root (sources: one photo per image)."""
    images = [image_bytes(i, sources[i % len(sources)] if sources else None) for i in range(len(VAL_SYNSETS))]
    root.mkdir(parents=True, exist_ok=True)
    if layout == "synset-files":
        for i, (data, s) in enumerate(zip(images, VAL_SYNSETS)):
            (root / f"{s}_{val_name(i)}.JPEG").write_bytes(data)
    elif layout == "synset-folders":
        for i, (data, s) in enumerate(zip(images, VAL_SYNSETS)):
            (root / s).mkdir(exist_ok=True)
            (root / s / f"{val_name(i)}.JPEG").write_bytes(data)
    elif layout == "val-csv":
        for i, data in enumerate(images):
            (root / f"{val_name(i)}.JPEG").write_bytes(data)
        write_solution(root / SOLUTION_CSV)
    elif layout == "devkit":
        write_devkit(root / DEVKIT)
        write_val_tar(root / VAL_TAR, images)
    else:
        raise ValueError(layout)
    return root


def write_solution(path: Path) -> None:
    """LOC_val_solution.csv: ImageId,PredictionString with boxes after each synset, rows unsorted."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i in reversed(range(len(VAL_SYNSETS))):
            s = VAL_SYNSETS[i]
            w.writerow([val_name(i), f"{s} 10 12 40 44 {s} 1 2 30 30 "])


def write_devkit(path: Path) -> None:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (the synsets struct, a non-leaf one included)
    and data/ILSVRC2012_validation_ground_truth.txt (one devkit ID per validation image)."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, f"class {w}", "a gloss", 0, np.zeros((1, 0)), 0, 1300) for w, i in DEVKIT_IDS.items()]
    rows.append((1001, "n00001740", "entity", "the root", 2, np.array([[1, 2]]), 18, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{DEVKIT_IDS[s]}\n" for s in VAL_SYNSETS).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("meta.mat", meta.getvalue()), ("ILSVRC2012_validation_ground_truth.txt", truth)):
            _add(tar, f"ILSVRC2012_devkit_t12/data/{name}", data)


def write_val_tar(path: Path, images: list[bytes]) -> None:
    """ILSVRC2012_img_val.tar: the JPEGs at its top, as the official one holds them."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            _add(tar, f"{val_name(i)}.JPEG", data)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def without_checksums(monkeypatch) -> None:
    """torchvision checks the archives against the official ones' MD5: these are other files."""
    from torchvision.datasets import imagenet

    for key in ("devkit", "val"):
        monkeypatch.setitem(imagenet.ARCHIVE_META, key, (imagenet.ARCHIVE_META[key][0], None))


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
