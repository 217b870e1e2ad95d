"""The HTML files `spiq sweep` and `spiq report` write, opened in a real browser with no network:
every figure is drawn, from the plotly bundle inlined in the file."""
import json
import os
import shutil
from pathlib import Path

import pytest
from playwright import sync_api

from spiq import cli
from conftest import TOY_CNN as TOY, labelled_photos

# A real browser: the slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPIQ_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture
def toy_inputs(tmp_path, toy_model):
    """The random mini CNN registered as a model, three labelled photos and a recipe that quantizes in seconds."""
    images = labelled_photos(tmp_path / "imgs", 3)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"method": "spiq", "weight_bits": 8, "input_bits": 4, "bias_images": 0,
                                  "weight_rounding": "nearest"}))
    return images, recipe


def drawn_figures(path: Path) -> tuple[int, int, int, list[str]]:
    """(plotly figures in the file, those drawn with at least one trace, still images decoded, what
    went wrong) in Chromium, every request that is not the file itself refused."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SPIQ_CHROMIUM)")
    problems, outside = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()

            def refuse(route):
                outside.append(route.request.url)
                route.abort()
            page.route(lambda url: not url.startswith(("file:", "data:", "blob:")), refuse)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(path.as_uri(), wait_until="load", timeout=120_000)
            total = page.locator("div.plotly-graph-div").count()
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {total}", timeout=120_000)
            # traces plotly drew: bars and lines (.trace), heatmaps (.hm), images (<image>)
            drawn = page.eval_on_selector_all(".js-plotly-plot", "els => els.filter(el => "
                                              "(el._fullData || []).length > 0 && "
                                              "el.querySelectorAll('.trace, .hm, image').length > 0).length")
            stills = page.eval_on_selector_all("img", "els => els.filter(el => el.naturalWidth > 0).length")
        finally:
            browser.close()
    return total, drawn, stills, problems + [f"network request: {u}" for u in outside]


def test_the_sweep_report_draws_every_figure_offline(toy_inputs, tmp_path):
    images, recipe = toy_inputs
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", TOY, "--images", str(images), "--methods", "spiq,static-tensor",
                     "--wbits", "8", "--abits", "8,4", "--config", str(recipe), "--out", str(out)]) == 0
    total, drawn, _, problems = drawn_figures(out / "report.html")
    # one weight width: agreement, top-1, logit SQNR, then the Pareto front
    assert total == 4 and drawn == total, problems
    assert not problems


def test_the_recipe_report_draws_every_figure_offline(toy_inputs, tmp_path):
    images, recipe = toy_inputs
    out = tmp_path / "report.html"
    assert cli.main(["report", "--model", TOY, "--config", str(recipe), "--images", str(images),
                     "--examples", "2", "--out", str(out)]) == 0
    total, drawn, stills, problems = drawn_figures(out)
    # the fold cost, then per image the predictions (a still image) and five plotly views
    assert total == 1 + 5 * 2 and drawn == total and stills == 2, problems
    assert not problems
