import hashlib

import pytest
import torch
from torch import nn

import spiq
from spiq.analysis.evaluate import predict
from spiq.core.quant import QuantLayer
from spiq.quantize import memo as memo_module
from spiq.quantize.memo import Memo, quantizable_layers
from spiq.ranges.laws import observe


def _checksum(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_quantize_leaves_the_float_model_untouched(lite0, sample, lite0_loaded):
    before = _checksum(lite0)
    x = sample[0][:4]
    with torch.no_grad():
        ref = lite0(x)
    q1 = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=4, input_bits=4))
    q2 = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="calib-mse", weight_bits=8, input_bits=6),
                       calib_data=sample[0][200:208])
    assert _checksum(lite0) == before
    assert not any(isinstance(m, QuantLayer) for m in lite0.modules())
    with torch.no_grad():
        assert torch.equal(lite0(x), ref)
        a, b = q1(x), q2(x)
    # each copy is its own: re-running the first after the second was built gives the same output
    with torch.no_grad():
        assert torch.equal(q1(x), a)
    assert not torch.equal(a, b)


def test_every_layer_quantized_and_reported(lite0, lite0_loaded):
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8))
    names = quantizable_layers(lite0)
    assert len(names) == 50
    assert all(isinstance(q.model.get_submodule(n), QuantLayer) for n in names)
    assert set(q.report.layers) == set(names)
    assert all(r.data_free_range_from == "bn" for r in q.report.layers.values())


def test_spiq_w8a8_agrees_with_float(lite0, subset, lite0_loaded):
    x, y, fp = subset
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8))
    agree = (predict(q, x) == fp).float().mean().item()
    assert agree >= 0.97, f"SPIQ W8A8 agrees with float on only {agree:.3f} of {len(fp)} real images"


def test_data_free_ranges_cover_real_activations(lite0, sample, lite0_loaded):
    """At 8 bits the BN-derived ranges clip almost nothing of what real images produce."""
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8))
    ref = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="dynamic-tensor", weight_bits=16, input_bits=16))
    for n in quantizable_layers(lite0):  # a float model with the same folding, through hooks
        ref.model.get_submodule(n).input_quant = None
    names = quantizable_layers(lite0)
    obs = observe(ref.model, names, sample[0][300:316])
    for n in names:
        rng = q.report.layers[n].range
        s = obs[n].sample
        lo, hi = (rng.lo, rng.hi) if rng.per_channel else (rng.lo.expand(len(s)), rng.hi.expand(len(s)))
        lost = (s - s.clamp(lo[:, None], hi[:, None])).norm() / s.norm()
        assert lost < 0.02, f"{n}: clipping removes {lost:.3f} of the real inputs' norm"
        # no channel is silenced: every range has room above zero where the channel does fire
        fires = obs[n].hi > 1e-3
        assert (hi[fires] > 0.05 * obs[n].hi[fires]).all(), f"{n}: a channel's range is far too narrow"


def test_per_layer_overrides(lite0, lite0_loaded):
    cfg = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4, overrides={
        "conv_stem": {"skip": True},
        "classifier": {"weight_bits": 4, "input_bits": 8, "input_granularity": "tensor"},
        "blocks.1.0.conv_dw": {"method": "dynamic-channel"},
    })
    q = spiq.quantize(lite0_loaded, cfg)
    assert isinstance(q.model.conv_stem, nn.Conv2d) and not isinstance(q.model.conv_stem, QuantLayer)
    cls = q.model.classifier
    assert cls.weight_codes.abs().max() <= 7 and cls.input_quant.bits == 8 and not cls.input_quant.per_channel
    assert q.model.get_submodule("blocks.1.0.conv_dw").input_quant.mode == "dynamic"
    assert q.model.get_submodule("blocks.1.0.conv_pw").input_quant.bits == 4


def test_unknown_override_layer_names_close_matches(lite0, lite0_loaded):
    cfg = spiq.QuantConfig(overrides={"block.1.0.conv_dw": {"skip": True}})
    with pytest.raises(spiq.ConfigError, match="block.1.0.conv_dw.*did you mean 'blocks.1.0.conv_dw'"):
        spiq.quantize(lite0_loaded, cfg)


def test_calibrated_methods_need_images(lite0, sample, lite0_loaded):
    with pytest.raises(spiq.ConfigError, match="calibration images"):
        spiq.quantize(lite0_loaded, spiq.QuantConfig(method="calib-minmax"))
    calib = sample[0][:8]
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="calib-minmax", input_granularity="channel",
                                              input_bits=8), calib_data=calib)
    # min/max per channel: the ranges are exactly what the calibration images produced
    ref = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="dynamic-tensor", weight_bits=16, input_bits=16))
    for n in quantizable_layers(lite0):
        ref.model.get_submodule(n).input_quant = None
    obs = observe(ref.model, ["blocks.3.0.conv_pwl"], calib)["blocks.3.0.conv_pwl"]
    rng = q.report.layers["blocks.3.0.conv_pwl"].range
    assert torch.allclose(rng.hi, obs.hi.clamp_min(1e-8), rtol=1e-3)  # ref has 16-bit weights


def test_calibrated_ranges_kept_across_bits_are_a_fresh_calls(lite0, sample, lite0_loaded, monkeypatch):
    calib = sample[0][:12]
    memo = Memo(lite0_loaded)
    observed = []
    monkeypatch.setattr(memo_module, "observe", lambda *a, **k: observed.append(1) or observe(*a, **k))
    for bits in (5, 4):   # percentile ranges do not depend on the bits: the second call reuses them
        cfg = spiq.QuantConfig(method="calib-percentile", weight_bits=8, input_bits=bits, calib_images=12)
        kept = spiq.quantize(lite0_loaded, cfg, calib_data=calib, memo=memo).report.layers
        fresh = spiq.quantize(lite0_loaded, cfg, calib_data=calib).report.layers
        for name in ("conv_stem", "blocks.3.0.conv_pwl", "classifier"):
            assert torch.equal(kept[name].range.hi, fresh[name].range.hi), (bits, name)
    assert len(observed) == 3   # the memo's first call, and each fresh call
    # warmed ahead (as the app does at start): the MSE ranges of a bit width, found, not searched
    cfg6 = spiq.QuantConfig(method="calib-mse", weight_bits=8, input_bits=6, calib_images=12)
    memo.warm_calibrated(calib, cfg6, bits=(6,))
    assert len(observed) == 4
    kept = spiq.quantize(lite0_loaded, cfg6, calib_data=calib, memo=memo).report.layers
    assert len(observed) == 4
    fresh = spiq.quantize(lite0_loaded, cfg6, calib_data=calib).report.layers
    assert all(torch.equal(kept[n].range.hi, fresh[n].range.hi) for n in kept)
    # other images: observed again
    other = spiq.quantize(lite0_loaded, cfg, calib_data=sample[0][100:112], memo=memo).report.layers
    assert len(observed) == 6
    assert not torch.equal(other["classifier"].range.hi, kept["classifier"].range.hi)


def test_dynamic_ranges_follow_each_sample(lite0, sample, lite0_loaded):
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="dynamic-channel", weight_bits=16, input_bits=16))
    x = sample[0][:2]
    with torch.no_grad():
        rel = ((q(x) - lite0(x)).norm() / lite0(x).norm()).item()
    assert rel < 1e-3  # 16-bit everything: the quantized model is the float one to 3 decimals
