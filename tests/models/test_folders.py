"""The labelled-folder layouts and the DataLoader over them: each layout gives each image its
synset's index, whatever order the layout numbers its classes in; unreadable images are reported
in the calling process whichever process decoded them."""
import os
import re
import shutil

import pytest
import torch
from PIL import Image

import imagenet_layouts as layouts
from spiq.models.data import DatasetError, ImageError, Preprocess
from spiq.models.folders import DEVKIT, SOLUTION_CSV, VAL_TAR, find_images, image_batches

PRE = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _labels(items) -> dict[str, int]:
    return {re.search(r"ILSVRC2012_val_\d+", p.name).group(0): label for p, label in items}


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_every_layout_gives_each_image_its_synsets_index(layout, tmp_path, monkeypatch):
    layouts.without_checksums(monkeypatch)
    root = layouts.build(layout, tmp_path / layout)
    items = find_images(root)
    assert len(items) == len(layouts.VAL_SYNSETS) and all(p.is_file() for p, _ in items)
    # 1, 812 and 999: neither torchvision's targets (0, 1, 2) nor the devkit's IDs minus one (2, 1, 0)
    assert _labels(items) == layouts.expected_labels()
    assert find_images(root) == items   # the same order the next time (the devkit: from meta.bin and val/)


def test_the_devkit_is_read_by_torchvision_and_its_errors_are_one_line(tmp_path, monkeypatch):
    root = layouts.build("devkit", tmp_path / "official")
    # the real archives' checksums: these are other files, which torchvision calls corrupted
    with pytest.raises(DatasetError, match=f"the ImageNet archives cannot be read: The archive {DEVKIT} .* corrupted"):
        find_images(root)
    layouts.without_checksums(monkeypatch)
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    shutil.copy(root / VAL_TAR, only_val / VAL_TAR)
    with pytest.raises(DatasetError, match=f"{VAL_TAR} needs {DEVKIT} beside it"):
        find_images(only_val)
    assert (root / "val").is_dir() is False
    assert _labels(find_images(root)) == layouts.expected_labels()
    assert (root / "meta.bin").is_file() and (root / "val").is_dir()   # torchvision's own extraction


def test_a_flat_validation_folder_needs_its_solution_csv(tmp_path):
    root = layouts.build("val-csv", tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "val")
    csv_path = root / SOLUTION_CSV
    # Kaggle's copy: the CSV four folders above the images
    shutil.move(csv_path, tmp_path / "kaggle" / SOLUTION_CSV)
    assert _labels(find_images(root)) == layouts.expected_labels()
    (tmp_path / "kaggle" / SOLUTION_CSV).unlink()
    with pytest.raises(DatasetError, match=f"ILSVRC2012_val_\\*.JPEG images need {SOLUTION_CSV} \\(columns ImageId,"
                                           "PredictionString\\)"):
        find_images(root)
    csv_path.write_text("ImageId,Label\nILSVRC2012_val_00000001,n01443537\n")
    with pytest.raises(DatasetError, match="expected the columns ImageId,PredictionString"):
        find_images(root)
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,tench 1 2 3 4\n")
    with pytest.raises(DatasetError, match=f"{SOLUTION_CSV}:2: 'tench 1 2 3 4' does not start with an ImageNet synset"):
        find_images(root)
    layouts.write_solution(csv_path)
    (root / "ILSVRC2012_val_00000099.JPEG").write_bytes(layouts.image_bytes(0))   # not in the CSV
    with pytest.raises(DatasetError, match="1 entries carry no ImageNet synset \\(ILSVRC2012_val_00000099.JPEG\\)"):
        find_images(root)


def _with_bad_image(tmp_path):
    root = layouts.build("synset-files", tmp_path / "imgs")
    bad = sorted(root.iterdir())[2]
    bad.write_text("not a picture")
    return root, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_in_the_calling_process_or_refused(tmp_path, workers):
    root, bad = _with_bad_image(tmp_path)
    items = find_images(root)
    skipped = []
    batches = list(image_batches(items, PRE, batch_size=4, workers=workers,
                                 on_skip=lambda path, exc: skipped.append((path, str(exc), os.getpid()))))
    assert skipped == [(bad, f"{bad}: not an image in any format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF...)",
                        os.getpid())]
    kept = torch.cat([b.indices for b in batches]).tolist()
    assert kept == [i for i, (p, _) in enumerate(items) if p != bad]
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.tensor([items[i][1] for i in kept]))
    assert torch.cat([b.images for b in batches]).shape == (len(kept), 3, 32, 32)
    with pytest.raises(ImageError) as err:   # the worker's message, not its traceback
        list(image_batches(items, PRE, batch_size=4, workers=workers))
    assert str(err.value) == skipped[0][1]


def test_workers_decode_the_same_tensors(tmp_path):
    root = layouts.build("synset-folders", tmp_path / "imgs")
    Image.new("L", (50, 40), 128).save(root / "n01443537" / "grey.png")
    items = find_images(root)
    one = torch.cat([b.images for b in image_batches(items, PRE, batch_size=32, workers=0)])
    two = torch.cat([b.images for b in image_batches(items, PRE, batch_size=3, workers=2)])
    assert torch.equal(one, two) and len(one) == len(items)
