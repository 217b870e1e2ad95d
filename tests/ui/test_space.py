"""What the Hugging Face Space reads: the README front matter, the pinned Gradio, free example images."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FREE = ("CC0", "public domain", "CC BY", "MIT", "BSD")


def _front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the README must open with the Space's front matter"
    block = text.split("---\n")[1]
    return {k.strip(): v.strip().strip('"') for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}


def test_front_matter_runs_this_app_on_the_pinned_gradio():
    fm = _front_matter()
    assert fm["sdk"] == "gradio" and (ROOT / fm["app_file"]).is_file() and fm["app_file"] == "app.py"
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert fm["sdk_version"] == pinned
    assert fm["title"] and 0 < len(fm["short_description"]) <= 60   # the Hub's limit


def test_every_example_image_is_listed_with_a_free_licence():
    rows = {}
    for line in (ROOT / "assets" / "LICENSES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[3]
    images = sorted(p.name for p in (ROOT / "assets").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert images and sorted(rows) == images
    assert all(any(f.lower() in licence.lower() for f in FREE) for licence in rows.values()), rows
    # the ImageNet sample is evaluation data: nothing named like it ships
    assert not any(re.match(r"n\d{8}_", name) for name in images)
