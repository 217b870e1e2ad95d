"""The Advisor tab's advice and views on EfficientNet-Lite0, with a sensitivity table given in place
of the measured one (measuring takes minutes on two shared cores; the browser test measures it)."""
import pytest

from spiq.analysis.sensitivity import LayerSensitivity, probed_layers
from spiq.config import LayerOverride, QuantConfig
from spiq.ui import advisor, plots, state, tab_advisor, tab_layer_error, tab_story, views, viewtabs
from spiq.ui.cache import ModelCache

MODEL = "efficientnet_lite0"
# an applied recipe with an override of its own, which the advice must keep
APPLIED = QuantConfig(input_bits=6, overrides={"conv_stem": LayerOverride(weight_bits=6, input_bits=5)})


def _table(model, config) -> list[LayerSensitivity]:
    """Every probed layer 30 dB at 4-bit inputs and 6 dB a bit more; the classifier's input far
    more sensitive (5 dB at 4 bits) and small: the advice must raise it."""
    names = probed_layers(model, config)
    sizes = {n: 1000 * (i + 1) for i, n in enumerate(names)}
    total = sum(sizes.values())
    rows = []
    for n in names:
        base = 5.0 if n == "classifier" else 30.0
        sqnr = {b: base + 6 * (b - 4) for b in advisor.ADVISOR_WIDTHS}
        rows.append(LayerSensitivity(n, sizes[n], 100, sizes[n] / total, 1 / len(names), sqnr,
                                     {b: 40.0 + 6 * (b - 4) for b in advisor.ADVISOR_WIDTHS}))
    return sorted(rows, key=lambda r: r.input_sqnr[4])


@pytest.fixture()
def cache(monkeypatch):
    """A cache of its own, with the advisor's table for APPLIED already there (as after the tab's
    first computation), in place of the app's."""
    cache = ModelCache(max_quantized=2)
    model = cache.load(MODEL).model
    table = _table(model, APPLIED)
    cache.slow(advisor.table_key(MODEL, APPLIED), lambda: table)
    monkeypatch.setattr(state, "CACHE", cache)
    return cache


def test_fill_gives_a_recipe_with_per_layer_overrides_that_apply_keeps(cache):
    model = cache.load(MODEL).model
    advised = tab_advisor.advised(MODEL, APPLIED, 4.5)
    bits = {n: advised.for_layer(n).input_bits for n in probed_layers(model, APPLIED)}
    assert bits["classifier"] == 8
    assert len(set(bits.values())) > 1
    table = {r.name: r for r in cache.cached_slow(advisor.table_key(MODEL, APPLIED))[1]}
    used = sum(table[n].input_values * b for n, b in bits.items()) / sum(r.input_values for r in table.values())
    assert 4.4 < used <= 4.5
    # overrides exactly where a layer's width is not the model-wide one, the most common width
    assert advised.input_bits == max(set(bits.values()), key=list(bits.values()).count)
    assert {n for n, o in advised.overrides.items() if o.input_bits} == {n for n, b in bits.items()
                                                                        if b != advised.input_bits}
    assert advised.overrides["conv_stem"].weight_bits == 6   # the recipe's own override kept
    # Fill shows the advice in the controls and the table, and Apply makes the same recipe of them
    controls, rows = views.control_values(advised), views.layer_rows(model, advised)
    assert [r[5] for r in rows] == [advised.for_layer(r[0]).input_bits for r in rows]
    assert views.config_from_controls(advised, *controls, rows).to_dict() == advised.to_dict()
    # the filled recipe finds the table its advice came from: no new measurement
    assert advisor.has_table(cache, MODEL, advised)


def test_the_advisor_view_and_the_layers_it_raises(cache):
    text, fig, rows = advisor.advisor(cache, MODEL, APPLIED, 4.5)
    assert "Budget 4.5 bits" in text and "predicted logit SQNR" in text
    assert rows[0][0] == "classifier" and rows[0][-1] == 8   # most sensitive first, raised
    advice = advisor.advice_for(cache.cached_slow(advisor.table_key(MODEL, APPLIED))[1], APPLIED, 4.5)
    assert {r[0]: r[-1] for r in rows} == advice.input_bits
    bars = [t for t in fig.data if t.type == "bar"]
    assert sum(len(t.x) for t in bars) == len(rows)
    assert {t.name for t in bars} == {f"advised: {b} bits" for b in set(advice.input_bits.values())}
    # another budget: another advice from the same table
    text6, _, rows6 = advisor.advisor(cache, MODEL, APPLIED, 6.0)
    assert "Budget 6 bits" in text6 and sum(r[-1] for r in rows6) > sum(r[-1] for r in rows)

    raised = advisor.layers_raised(cache, MODEL, APPLIED, 4.5)
    assert raised["classifier"] == 8 and all(b > 4 for b in raised.values())
    sqnr = plots.layer_sqnr([views.analysis.LayerSQNR(n, 20.0, 10.0) for n in advice.input_bits], raised=raised,
                            budget=4.5)
    marks = next(t for t in sqnr.data if t.name.startswith("advisor raises"))
    assert set(marks.x) == set(raised) and "A8" in marks.text
    # a recipe the advisor has not measured: nothing marked, nothing measured
    assert advisor.layers_raised(cache, MODEL, QuantConfig(weight_bits=6), 4.5) is None


def test_the_layer_error_tab_is_drawn_again_once_the_advisor_measured(cache):
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    measured = viewtabs.Request(MODEL, APPLIED, image, views.image_digest(image), {"budget": 5.0})
    other = viewtabs.Request(MODEL, QuantConfig(weight_bits=6), image, views.image_digest(image), {"budget": 5.0})
    assert viewtabs.drawn_key(cache, measured, tab_layer_error.WORK) == measured.drawn() + "|5.0"
    assert viewtabs.drawn_key(cache, other, tab_layer_error.WORK) == other.drawn()
    assert viewtabs.drawn_key(cache, measured, tab_story.WORK) == measured.drawn()


def test_the_advisor_refuses_what_it_cannot_measure(cache):
    text, fig, rows = advisor.advisor(cache, MODEL, QuantConfig(method="calib-minmax"), 4.5)
    assert "calibration images" in text and fig is None and rows == []
    with pytest.raises(Exception, match="budget must be from 4 to 8 bits in steps of 0.25"):
        tab_advisor.advised(MODEL, APPLIED, 9.0)
