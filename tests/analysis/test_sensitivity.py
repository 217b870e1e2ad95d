"""Data-free sensitivity and the mixed-precision advisor (EfficientNet-Lite0, distilled images)."""
import itertools
import math
from pathlib import Path

import pytest
import torch

import spiq
from spiq.analysis.advise import allocate, advise
from spiq.analysis.sensitivity import probe_config, probed_layers
from spiq.config import ConfigError, LayerOverride
from spiq.core.metrics import tensor_sqnr_db
from spiq.quantize.api import check_config

from conftest import SAMPLE_DIR, SENSITIVITY_CONFIG, SENSITIVITY_WIDTHS

CONFIG = spiq.QuantConfig(**SENSITIVITY_CONFIG)
LO, HI = SENSITIVITY_WIDTHS


def test_no_real_image_is_read(lite0_sensitivity):
    _, opened, _, _ = lite0_sensitivity
    distilled = Path(spiq.__file__).parent / "quantize" / "distilled"
    for path in opened:   # at most the shipped distilled PNGs (or their cached copies)
        assert SAMPLE_DIR.name not in path and (str(distilled) in path or "distilled" in path), path


def test_every_layer_and_shares(lite0_sensitivity, lite0):
    table, _, _, _ = lite0_sensitivity
    assert sorted(r.name for r in table) == sorted(probed_layers(lite0, CONFIG))
    assert math.isclose(sum(r.input_share for r in table), 1.0)
    assert math.isclose(sum(r.weight_share for r in table), 1.0)
    stem = next(r for r in table if r.name == "conv_stem")
    assert stem.input_values == 3 * 224 * 224


def test_four_bits_cost_more_than_eight(lite0_sensitivity):
    table, _, _, _ = lite0_sensitivity
    for r in table:
        assert r.input_sqnr[LO] < r.input_sqnr[HI] - 6, r.name    # ~6 dB a bit
        assert r.weight_sqnr[LO] < r.weight_sqnr[HI] - 6, r.name
    ranked = [r.input_sqnr[LO] for r in table]
    assert ranked == sorted(ranked)   # most sensitive input first


def test_classifier_and_stem_inputs_are_among_the_most_sensitive(lite0_sensitivity):
    # what the data says at 4 bits: the classifier's input (1280 pooled features, one range per
    # tensor) is the single worst of 50; the stem's (the image) is in the top fifth
    table, _, _, _ = lite0_sensitivity
    names = [r.name for r in table]
    assert names[0] == "classifier"
    assert names.index("conv_stem") < len(names) // 5


def test_the_probe_is_quantize_with_every_other_layer_skipped(lite0_sensitivity, lite0_loaded):
    table, _, images, memo = lite0_sensitivity
    names = probed_layers(lite0_loaded.model, CONFIG)
    config = probe_config(CONFIG, names, "input", LO)
    alone = config.replace(overrides={**config.overrides, **{n: LayerOverride(skip=True)
                                                           for n in names if n != "classifier"}})
    q = spiq.quantize(lite0_loaded, alone, memo=memo)
    with torch.no_grad():
        expected = tensor_sqnr_db(lite0_loaded.model(images), q(images))
    assert next(r for r in table if r.name == "classifier").input_sqnr[LO] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("budget", [4.0, 4.1, 4.5, 5.0, 6.5, 8.0])
def test_the_advised_recipe_respects_the_budget(lite0_sensitivity, lite0, budget):
    table, _, _, _ = lite0_sensitivity
    adv = advise(table, CONFIG, budget, SENSITIVITY_WIDTHS)
    size = {r.name: r.input_values for r in table}
    used = sum(size[n] * adv.config.for_layer(n).input_bits for n in size) / sum(size.values())
    assert used <= budget + 1e-12 and used == pytest.approx(adv.input_budget_used)
    assert used > budget - 0.05   # the budget is spent, not left over
    assert all(adv.config.for_layer(n).weight_bits == 8 for n in size)
    check_config(lite0, spiq.QuantConfig.from_json(adv.config.to_json()))   # an ordinary recipe


def test_a_bigger_budget_never_predicts_lower_sqnr(lite0_sensitivity):
    table, _, _, _ = lite0_sensitivity
    predicted = [advise(table, CONFIG, b, SENSITIVITY_WIDTHS).predicted_sqnr_db
                 for b in [4 + i / 4 for i in range(17)]]
    assert predicted == sorted(predicted) and predicted[-1] > predicted[0] + 15
    assert advise(table, CONFIG, 4.0, SENSITIVITY_WIDTHS).input_bits == {r.name: 4 for r in table}


def test_a_weight_budget_picks_weight_widths(lite0_sensitivity):
    table, _, _, _ = lite0_sensitivity
    adv = advise(table, CONFIG, 4.5, SENSITIVITY_WIDTHS, weight_budget=5.0)
    assert adv.weight_budget_used <= 5.0 and set(adv.weight_bits.values()) == {4, 8}


def test_the_dynamic_programme_is_exact_on_a_small_problem():
    noise = [{4: 1.0, 5: 0.3, 8: 0.01}, {4: 0.5, 5: 0.45, 8: 0.001}, {4: 2.0, 5: 0.1, 8: 0.09}]
    sizes = [3, 7, 2]
    for budget in [4.0, 4.4, 4.9, 5.5, 6.0, 7.3, 8.0]:
        best = min((c for c in itertools.product(*(sorted(n) for n in noise))
                    if sum(s * b for s, b in zip(sizes, c)) <= budget * sum(sizes)),
                   key=lambda c: sum(n[b] for n, b in zip(noise, c)))
        assert tuple(allocate(noise, sizes, budget)) == best, budget


@pytest.mark.parametrize("budget, widths", [(3.9, (4, 8)), (8.5, (4, 8)), (math.nan, (4, 8)), (5, (1, 8)),
                                            (5, ())])
def test_bad_budgets_and_widths_are_refused(lite0_sensitivity, budget, widths):
    table, _, _, _ = lite0_sensitivity
    with pytest.raises(ConfigError):
        advise(table, CONFIG, budget, widths)


def test_the_advice_replaces_an_overrides_input_width_and_keeps_the_rest():
    from spiq.analysis.sensitivity import LayerSensitivity

    widths = {b: 20.0 + 6 * (b - 4) for b in (4, 8)}
    table = [LayerSensitivity("a", 100, 10, 0.5, 0.5, dict(widths), dict(widths)),
             LayerSensitivity("b", 100, 10, 0.5, 0.5, {4: 0.0, 8: 24.0}, dict(widths))]
    config = spiq.QuantConfig(input_bits=4, overrides={"a": LayerOverride(input_bits=8, weight_bits=6),
                                                       "b": LayerOverride(input_granularity="tensor")})
    adv = advise(table, config, 6.0, (4, 8))   # b is the sensitive one: it gets the 8 bits
    assert adv.input_bits == {"a": 4, "b": 8}
    assert adv.config.overrides["a"] == LayerOverride(weight_bits=6)   # no old input width; weights kept
    assert adv.config.overrides["b"] == LayerOverride(input_bits=8, input_granularity="tensor")
