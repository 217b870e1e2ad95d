"""The app's examples open on one that shows SPIQ's point, as bench/order_examples.py ordered them."""
from pathlib import Path

import pytest
import spiq

from spiq.analysis.examples import example_order, score_example
from spiq.models.data import IMAGE_EXTENSIONS, open_image

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def scores(lite0_loaded):
    q = {m: spiq.quantize(lite0_loaded, spiq.QuantConfig(method=m, weight_bits=8, input_bits=4))
         for m in ("spiq", "static-tensor")}
    files = sorted(f for f in ASSETS.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    return [score_example(lite0_loaded, f.name, lite0_loaded.preprocess(open_image(f)), q["spiq"], q["static-tensor"])
            for f in files]


@pytest.mark.slow   # two quantizations with the bias fit, as the app makes them
def test_the_first_example_shows_spiq_keeping_what_static_per_tensor_loses(scores):
    shipped = (ASSETS / "examples.txt").read_text().split()
    assert shipped == example_order(scores)   # the file is what the script writes today
    first = next(s for s in scores if s.name == shipped[0])
    assert first.shows_spiq and first.spiq_kept and first.confident
    assert first.static_flipped or first.sqnr_gain_db >= 2
    cat = next(s for s in scores if s.name == "cat.jpg")
    assert not cat.confident   # the near-tie that every method flips is not a first example


def test_the_app_lists_every_shipped_image_once_in_that_order():
    from spiq.ui.page import EXAMPLES

    shipped = (ASSETS / "examples.txt").read_text().split()
    assert [Path(e).name for e in EXAMPLES] == shipped
    assert sorted(shipped) == sorted(f.name for f in ASSETS.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
