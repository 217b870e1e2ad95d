import base64
import io

import numpy as np
import pytest
from PIL import Image

from spiq.models.data import ImageError, open_image, DatasetError
from spiq.models.folders import find_images


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")
    with pytest.raises(ImageError, match="not an image in any format"):
        open_image(b"this is not an image at all")
    data = _png(Image.new("RGB", (64, 64), "red"))
    with pytest.raises(ImageError, match="corrupt|truncated|not an image"):
        open_image(data[: len(data) // 2])
    # a decompression bomb: a tiny file announcing 30000 x 30000 pixels
    bomb = _png(Image.new("1", (30000, 30000)))
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageError, match="too large"):
        open_image(bomb)
    big = _png(Image.new("1", (8000, 6000)))  # under PIL's own limit, over ours
    with pytest.raises(ImageError, match="too large: 8000x6000"):
        open_image(big)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_any_mode_becomes_rgb(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode) \
        if mode != "I;16" else Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    out = open_image(_png(img) if mode != "CMYK" else _jpeg(img))
    assert out.mode == "RGB" and out.size == (30, 20)


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (10, 40)


def test_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_images(tmp_path / "nope")
    with pytest.raises(DatasetError, match="holds no images"):
        find_images(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "holiday.jpg")
    with pytest.raises(DatasetError, match="no ImageNet synset"):
        find_images(tmp_path)
    (tmp_path / "holiday.jpg").unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "n01443537_goldfish.jpg")
    (tmp_path / "n01440764").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "n01440764" / "a.png")
    assert sorted(label for _, label in find_images(tmp_path)) == [0, 1]


def test_sides_and_aspect_ratio_are_bounded_before_decoding():
    from spiq.models.data import MAX_ASPECT, MAX_SIDE

    for size in [(100_000, 10), (10, 30_000), (MAX_SIDE + 1, 2000)]:
        with pytest.raises(ImageError, match="times the other|no side may exceed"):
            open_image(_png(Image.new("RGB", size)))
    wide = open_image(_png(Image.new("RGB", (MAX_ASPECT * 20, 20))))   # at the bound: accepted
    assert wide.size == (MAX_ASPECT * 20, 20)


def test_every_source_is_held_to_one_byte_limit(tmp_path, monkeypatch):
    from spiq.models import data

    payload = _png(Image.new("RGB", (64, 64), (10, 200, 30)))
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", len(payload) - 1)
    path = tmp_path / "x.png"
    path.write_bytes(payload)
    for source in (payload, str(path), io.BytesIO(payload)):
        with pytest.raises(ImageError, match="the limit is"):
            open_image(source)
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    with pytest.raises(ImageError, match="the limit is"):
        data.decode_data_url(url)
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", len(payload))
    assert open_image(data.decode_data_url(url)).size == (64, 64)


def test_only_files_inside_the_given_folders_are_opened(tmp_path):
    from spiq.models.data import REFUSED_FILE, open_allowed_image

    inside, outside = tmp_path / "uploads", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok.png").write_bytes(_png(Image.new("RGB", (8, 8))))
    (outside / "secret.png").write_bytes(_png(Image.new("RGB", (8, 8))))
    (inside / "link.png").symlink_to(outside / "secret.png")
    assert open_allowed_image(inside / "ok.png", [inside]).size == (8, 8)
    for path in (outside / "secret.png", inside / "link.png", inside / "missing.png", inside,
                 inside / ".." / "elsewhere" / "secret.png"):
        with pytest.raises(ImageError) as err:
            open_allowed_image(path, [inside])
        assert str(err.value) == REFUSED_FILE   # the same words whatever the path is
