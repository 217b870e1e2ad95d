"""`spiq report`: one offline HTML file with the recipe, the accuracy `spiq evaluate` measures on the
same folder, and the app's views of a few images. On a random mini CNN and the example photos, so
the fast tier needs nothing outside the repository; on Lite0 and the ImageNet sample in the slow tier."""
import json
import os
import re
from pathlib import Path

import pytest

from spiq import cli
from conftest import labelled_photos

ROOT = Path(__file__).resolve().parents[2]
# Per image: the predictions (a still image), then channel ranges, layer error, its split by source,
# error map and attribution (plotly).
VIEWS_PER_IMAGE = 5


@pytest.fixture
def folder(tmp_path):
    images = labelled_photos(tmp_path / "imgs")
    recipe = tmp_path / "recipe.json"
    # no distillation, no rounding search: seconds, not minutes
    recipe.write_text(json.dumps({"method": "spiq", "weight_bits": 8, "input_bits": 4, "bias_images": 0,
                                  "weight_rounding": "nearest"}))
    return images, recipe


def figures(page: str) -> int:
    return page.count('class="plotly-graph-div"')


def stills(page: str) -> int:
    return page.count('<img alt="figure" src="data:image/png;base64,')


def make_report(model, images, recipe, out, *extra) -> int:
    return cli.main(["report", "--model", model, "--config", str(recipe), "--images", str(images), "--out", str(out),
                     *extra])


def evaluate_json(model, images, recipe, out, *extra) -> dict:
    assert cli.main(["evaluate", "--model", model, "--config", str(recipe), "--images", str(images),
                     "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def check_report(page: str, recipe: Path, expected: dict, shown: int) -> None:
    """The recipe, the numbers `spiq evaluate` gave, the figures of `shown` images and the fold cost."""
    config = json.loads(re.search(r'<pre class="recipe">(.*?)</pre>', page, re.S).group(1).replace("&quot;", '"'))
    assert {k: config[k] for k in json.loads(recipe.read_text())} == json.loads(recipe.read_text())
    assert f"{expected['top1'] * 100:.2f} %" in page and f"{expected['top1_fp'] * 100:.2f} %" in page
    assert f"{expected['agreement'] * 100:.2f} %" in page
    assert re.search(r"mean logit SQNR against the float model</th><td>-?\d+\.\d\d dB", page)
    assert f"{expected['n_images']} from" in page
    assert figures(page) == 1 + VIEWS_PER_IMAGE * shown and stills(page) == shown
    assert len(re.findall(r"<script>/\*\*\s*\* plotly\.js v", page)) == 1   # the bundle, inlined once
    assert "<script src=" not in page   # no script from the network


def test_report_holds_the_recipe_the_accuracy_of_evaluate_and_the_views(toy_model, folder, tmp_path, capsys):
    images, recipe = folder
    out = tmp_path / "sub" / "report.html"
    assert make_report(toy_model, images, recipe, out, "--limit", "3", "--examples", "1") == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "views" in err and "1/1" in err   # the progress bars ran
    expected = evaluate_json(toy_model, images, recipe, tmp_path / "e.json", "--limit", "3")
    check_report(out.read_text(encoding="utf-8"), recipe, expected, shown=1)


def test_the_images_shown_are_the_flipped_ones_first_then_folder_order():
    import torch

    from spiq.ui.report import pick_images

    paths = [Path(f"{i}.jpg") for i in range(5)]
    fp, q = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 0, 3, 0, 5])
    assert pick_images(paths, fp, q, 3) == [(Path("1.jpg"), True), (Path("3.jpg"), True), (Path("0.jpg"), False)]
    assert [p.name for p, _ in pick_images(paths, fp, q, 9)] == [f"{i}.jpg" for i in (1, 3, 0, 2, 4)]   # no more than evaluated


@pytest.mark.parametrize("case", ["missing config", "bad config", "out under a file", "read-only folder",
                                  "out is a folder", "unknown model", "no images"])
def test_report_refuses_bad_arguments_before_any_work(case, toy_model, folder, tmp_path, capsys, monkeypatch):
    from spiq.ui import cache

    images, recipe = folder
    model, out = toy_model, tmp_path / "report.html"
    if case == "missing config":
        recipe = tmp_path / "nope.json"
    elif case == "bad config":
        recipe.write_text(json.dumps({"method": "spiq", "input_bits": 99}))
    elif case == "out under a file":
        (tmp_path / "file.txt").write_text("x")
        out = tmp_path / "file.txt" / "report.html"
    elif case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into any folder")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "report.html"
    elif case == "out is a folder":
        out = tmp_path
    elif case == "unknown model":
        model = "efficientnet_lite9"
    else:
        images = tmp_path / "empty"
        images.mkdir()
    monkeypatch.setattr(cache, "load_model", lambda name: pytest.fail("loaded a model before refusing"))
    assert make_report(model, images, recipe, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spiq: error:") and len(err.splitlines()) == 1, err
    assert not out.is_file()


def test_report_on_lite0_matches_evaluate_on_the_sample(sample_dir, tmp_path):
    """The real model on real images: the numbers of `spiq evaluate`, the views of the flipped image first."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"method": "spiq", "weight_bits": 8, "input_bits": 4}))
    out = tmp_path / "report.html"
    assert make_report("efficientnet_lite0", sample_dir, recipe, out, "--limit", "12", "--examples", "1") == 0
    expected = evaluate_json("efficientnet_lite0", sample_dir, recipe, tmp_path / "e.json", "--limit", "12")
    check_report(out.read_text(encoding="utf-8"), recipe, expected, shown=1)
