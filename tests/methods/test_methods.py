"""The methods by name: their properties, the options each one checks, the registry's refusals."""
import dataclasses

import pytest
import torch

import spiq
from spiq.core.tensors import Range
from spiq.config import METHODS, ConfigError, QuantConfig
from spiq.methods.registry import METHODS as REGISTERED
from spiq.methods import layerwise
from spiq.methods.calibrated import CalibratedRange
from spiq.methods.plans import LayerInput, LayerPlan, MethodPlan
from spiq.methods.registry import Method, get_method, register, registered
from spiq.methods.spiq import data_free_range
from spiq.models.toy import toy_cnn


def test_every_method_is_registered_in_the_app_order_with_its_properties():
    assert list(METHODS) == ["spiq", "static-tensor", "calib-minmax", "calib-percentile", "calib-mse",
                             "dynamic-tensor", "dynamic-channel", "liu-ptq"]
    assert list(REGISTERED) == list(METHODS)
    assert METHODS["spiq"] == get_method("spiq").description
    assert [m for m in METHODS if get_method(m).data_free] == ["spiq", "static-tensor"]
    assert [m for m in METHODS if get_method(m).calibration] == ["calib-minmax", "calib-percentile", "calib-mse"]
    assert [m for m in METHODS if get_method(m).transformer_only] == ["liu-ptq"]
    assert [m for m in METHODS if get_method(m).needs_calibration] == \
        ["calib-minmax", "calib-percentile", "calib-mse", "liu-ptq"]
    assert [m for m in METHODS if get_method(m).input_granularity == "channel"] == ["spiq", "dynamic-channel"]
    assert [m for m in METHODS if get_method(m).int8_graph] == ["spiq", "static-tensor", "calib-minmax",
                                                               "calib-percentile", "calib-mse"]
    assert [m for m in METHODS if get_method(m).fold_choice] == ["spiq"]
    assert [m for m in METHODS if get_method(m).plan is not layerwise.plan_layers] == ["liu-ptq"]


def test_a_layer_input_gets_its_range_from_its_method():
    bounds = Range(torch.tensor(0.0), torch.tensor(1.0))
    measured = Range(torch.tensor(-1.0), torch.tensor(2.0))
    x = LayerInput("fc", 8, False, QuantConfig(), None, None, {"fc": measured}, bounds)
    assert get_method("static-tensor").input_range(x) is bounds      # known bounds, whatever the data
    assert get_method("calib-mse").input_range(x) is measured
    assert get_method("dynamic-channel").input_range(x) is None      # per sample at run time
    assert get_method("calib-percentile").calibration(6, True, QuantConfig(percentile=99.9)) == \
        CalibratedRange("percentile", None, True, 99.9)


def _bypassing_checks(**changes) -> QuantConfig:
    """A config holding values QuantConfig would refuse, to call one method's own check on."""
    config = QuantConfig()
    for name, value in changes.items():
        object.__setattr__(config, name, value)
    return config


@pytest.mark.parametrize("method,field,value,words", [
    ("spiq", "fold", "sometimes", "fold must be one of auto, always"),
    ("spiq", "range_rule", "max", "range_rule must be one of"),
    ("spiq", "n_sigma", 0, r"n_sigma must be a number in \(0, 100\]"),
    ("spiq", "clip_penalty", True, "clip_penalty must be a number"),
    ("calib-percentile", "percentile", 30, r"percentile must be in \(50, 100\]"),
    ("calib-minmax", "calib_images", 0, "calib_images must be a positive integer"),
    ("liu-ptq", "search_points", 0, "search_points must be a positive integer"),
    ("liu-ptq", "search_tokens", 1.5, "search_tokens must be a positive integer"),
    ("liu-ptq", "rank_pairs", True, "rank_pairs must be a positive integer"),
    ("liu-ptq", "rank_weight", -1, "rank_weight must be a number from 0 to 100"),
    ("liu-ptq", "rank_margin", 2000, "rank_margin must be a number from 0 to 1000"),
    ("liu-ptq", "mixed_precision", 40, "mixed_precision must be average bits from 2 to 16"),
])
def test_each_method_refuses_a_bad_option_of_its_own_by_name(method, field, value, words):
    owner = get_method(method)
    assert field in owner.options
    with pytest.raises(ConfigError, match=words):
        owner.validate(_bypassing_checks(**{field: value}))
    # QuantConfig runs every method's check, whatever method it names
    with pytest.raises(ConfigError, match=words):
        QuantConfig(method="dynamic-tensor" if field != "mixed_precision" else "liu-ptq", **{field: value})


def test_options_of_one_method_stay_with_it():
    with pytest.raises(ConfigError, match="mixed_precision is part of method 'liu-ptq', not 'spiq'"):
        QuantConfig(method="spiq", mixed_precision=6)
    with pytest.raises(ConfigError, match=r"int8_graph .* static method \(spiq, static-tensor, calib-minmax"):
        QuantConfig(method="dynamic-tensor", int8_graph=True)
    assert QuantConfig(method="calib-mse", weight_bits=8, input_bits=8, int8_graph=True).int8_graph


def test_check_config_runs_the_methods_checks():
    config = _bypassing_checks(search_rounds=0)
    with pytest.raises(ConfigError, match="search_rounds must be a positive integer"):
        spiq.quantize(toy_cnn(), config)


@pytest.mark.parametrize("name,close", [("spiqq", "'spiq'"), ("calib-minmx", "'calib-minmax'"),
                                        ("dynamic_tensor", "'dynamic-tensor'")])
def test_an_unknown_method_is_refused_with_a_suggestion(name, close):
    with pytest.raises(ConfigError, match=f"unknown method '{name}'.*did you mean {close}"):
        get_method(name)
    with pytest.raises(ConfigError, match=f"method must be one of .*did you mean {close}"):
        QuantConfig(method=name)


def test_the_registry_refuses_an_incomplete_or_repeated_method():
    with pytest.raises(ValueError, match="registered twice"):
        register(get_method("spiq"))
    with pytest.raises(ValueError, match="either input_range or plan"):
        register(Method("half", "neither a range nor a search"))
    with pytest.raises(ValueError, match="data-free law"):
        register(dataclasses.replace(get_method("calib-mse"), name="calib-fold", fold_choice=True))
    assert "half" not in REGISTERED and "calib-fold" not in REGISTERED


def test_a_new_method_is_one_registration_and_quantize_plans_with_it():
    """What a newcomer writes for a method: its range rule (here the data-free range, halved), or a
    handler of its own; nothing in spiq.quantize changes, and the method is gone after the block."""
    def half_range(x: LayerInput) -> Range:
        rng = data_free_range(x)
        return Range(rng.lo / 2, rng.hi / 2)

    model, pre = toy_cnn()
    with registered(Method("half-law", "half the data-free range", input_range=half_range)) as half:
        assert half.plan is layerwise.plan_layers and "half-law" in METHODS
        q = spiq.quantize(model, QuantConfig(method="half-law", bias_images=0), preprocess=pre)
        full = spiq.quantize(model, QuantConfig(method="static-tensor", bias_images=0), preprocess=pre)
        name = next(n for n, lp in q.report.layers.items() if lp.data_free_range_from == "bn")
        got, ref = q.report.layers[name], full.report.layers[name]
        assert isinstance(got, LayerPlan) and got.method == "half-law"
        assert torch.equal(got.range.hi, ref.range.hi / 2)

        def skip_all(ctx, method) -> MethodPlan:   # a handler of its own: plans no layer
            return MethodPlan()

        with registered(Method("nothing", "leaves every layer float", plan=skip_all)):
            assert not spiq.quantize(model, QuantConfig(method="nothing", bias_images=0), preprocess=pre).report.layers
    assert "half-law" not in METHODS and "nothing" not in REGISTERED
    with pytest.raises(ConfigError, match="method must be one of"):
        QuantConfig(method="half-law")
