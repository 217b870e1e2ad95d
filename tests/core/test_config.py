import json

import pytest

from spiq import ConfigError, LayerOverride, QuantConfig


def test_flat_json_without_overrides():
    cfg = QuantConfig(method="spiq", weight_bits=8, input_bits=4)
    assert json.loads(cfg.to_json()) == {"version": 1, "method": "spiq", "weight_bits": 8, "input_bits": 4}
    assert QuantConfig.from_json('{"version": 1, "method": "spiq", "weight_bits": 8, "input_bits": 4}') == cfg


def test_a_recipe_without_version_is_version_1():
    assert QuantConfig.from_json('{"method": "spiq", "weight_bits": 8, "input_bits": 4}') == \
        QuantConfig(method="spiq", weight_bits=8, input_bits=4)
    assert QuantConfig.from_dict({"method": "calib-mse", "calib_images": 8}).to_dict()["version"] == 1


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_an_unknown_version_is_refused_by_name(version):
    with pytest.raises(ConfigError, match=r"^version: .*version 1, got"):
        QuantConfig.from_dict({"version": version, "method": "spiq"})


def test_round_trip_with_every_field_and_overrides():
    cfg = QuantConfig(method="calib-percentile", weight_bits=6, input_bits=5, input_granularity="channel",
                      weight_granularity="tensor", weight_clip="max", tail="laplace", clip_penalty=2.0,
                      bias_correction=False, percentile=99.9, calib_images=8, weight_rounding="nearest",
                      range_rule="sigma", n_sigma=3.0, tail_depthwise=None, tail_sum="gauss", fold="always", equalize=True,
                      overrides={"conv_stem": LayerOverride(skip=True),
                                 "classifier": {"input_bits": 8, "method": "dynamic-channel"}})
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.overrides["classifier"] == LayerOverride(method="dynamic-channel", input_bits=8)


@pytest.mark.parametrize("field,value,words", [
    ("weight_bits", 1, "weight_bits must be from 2 to 16"),
    ("input_bits", 17, "input_bits must be from 2 to 16"),
    ("input_bits", 4.5, "input_bits must be an integer"),
    ("weight_bits", "8", "weight_bits must be an integer"),
    ("weight_bits", True, "weight_bits must be an integer"),
    ("method", "spiqq", "did you mean 'spiq'"),
    ("input_granularity", "row", "input_granularity must be one of"),
    ("tail", "cauchy", "tail must be one of"),
    ("equalize", "yes", "equalize must be true or false"),
    ("bias_images", -1, "bias_images must be an integer from 0 to 256"),
    ("bias_images", True, "bias_images must be an integer"),
    ("bias_images", 8.0, "bias_images must be an integer"),
])
def test_bad_fields_are_named(field, value, words):
    with pytest.raises(ConfigError, match=words):
        QuantConfig(**{field: value})


def test_malformed_json_and_unknown_fields():
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{method: spiq")
    with pytest.raises(ConfigError, match="unknown config field 'wieght_bits'.*weight_bits"):
        QuantConfig.from_json('{"wieght_bits": 8}')
    with pytest.raises(ConfigError, match="must be a JSON object"):
        QuantConfig.from_json("[8, 4]")
    with pytest.raises(ConfigError, match=r"overrides\['conv_stem'\]: unknown field 'bitz'"):
        QuantConfig.from_dict({"overrides": {"conv_stem": {"bitz": 4}}})
    with pytest.raises(ConfigError, match=r"overrides\['conv_stem'\].input_bits must be from 2 to 16"):
        QuantConfig.from_dict({"overrides": {"conv_stem": {"input_bits": 40}}})


def test_layer_settings_follow_overrides():
    cfg = QuantConfig(method="spiq", weight_bits=8, input_bits=4,
                      overrides={"a": {"method": "static-tensor"}, "b": {"input_bits": 8, "input_granularity": "tensor"}})
    assert cfg.for_layer("x").input_per_channel and cfg.for_layer("x").input_bits == 4
    assert not cfg.for_layer("a").input_per_channel  # a method's own granularity comes with it
    b = cfg.for_layer("b")
    assert b.method == "spiq" and b.input_bits == 8 and not b.input_per_channel


def test_bias_images_default_is_automatic_and_stays_out_of_the_json():
    assert QuantConfig().bias_images is None
    assert QuantConfig.from_json('{"method": "spiq", "weight_bits": 8, "input_bits": 4, "bias_images": null}') == \
        QuantConfig(input_bits=4)
    assert QuantConfig(bias_images=0).to_dict() == {"version": 1, "method": "spiq", "weight_bits": 8, "input_bits": 8,
                                                     "bias_images": 0}


def test_hostile_json_is_refused_before_parsing():
    with pytest.raises(ConfigError, match="nested more than"):
        QuantConfig.from_json("[" * 200_000)
    with pytest.raises(ConfigError, match="nested more than"):
        QuantConfig.from_json('{"overrides": {"a": {"b": ' + "[" * 20 + "]" * 20 + "}}}")
    with pytest.raises(ConfigError, match="small JSON text"):
        QuantConfig.from_json('{"method": "spiq", "x": "' + "a" * 1_000_001 + '"}')
    # brackets inside strings are text, not nesting
    with pytest.raises(ConfigError, match="unknown config field 'note'"):
        QuantConfig.from_json('{"note": "' + "[" * 50 + '\\\\"}')
    assert QuantConfig.from_json('{"overrides": {"conv_stem": {"skip": true}}}').overrides["conv_stem"].skip
