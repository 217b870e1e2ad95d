"""The fast tier's CNN: quantization, its error and its int8 export on a random mini CNN with the
blocks of a mobile network (conv-BN-ReLU6, depthwise, residual, squeeze-excitation) and the shipped
example photos. Needs nothing outside the repository."""
from pathlib import Path

import pytest
import torch

import spiq
from spiq.core.metrics import mean_logit_sqnr_db, parameter_checksum
from spiq.models.data import open_image
from spiq.models.toy import toy_cnn

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ["cat", "coffee", "rocket", "astronaut", "camera"]


@pytest.fixture(scope="module")
def toy():
    model, pre = toy_cnn()
    images = torch.stack([pre(open_image(ROOT / "assets" / f"{n}.jpg")) for n in PHOTOS])
    with torch.no_grad():
        return model, images, model(images)


def _sqnr(toy, **config) -> float:
    model, images, ref = toy
    q = spiq.quantize(model, spiq.QuantConfig(bias_images=0, **config))
    with torch.no_grad():
        return mean_logit_sqnr_db(ref, q(images))


@pytest.mark.parametrize("bits", [8, 5])
def test_spiq_beats_static_per_tensor_where_channels_differ(toy, bits):
    """SPIQ's claim on a small scale: per-channel static ranges from BN statistics lose less than
    one data-free range per tensor, and dynamic per-channel ranges (set per image) lose least."""
    spiq_db = _sqnr(toy, method="spiq", input_bits=bits)
    assert spiq_db > _sqnr(toy, method="static-tensor", input_bits=bits) + 1.0
    assert _sqnr(toy, method="dynamic-channel", input_bits=bits) > spiq_db


def test_every_cnn_method_quantizes_and_leaves_the_float_model_alone(toy):
    model, images, _ = toy
    before = parameter_checksum(model)
    for method in ("spiq", "static-tensor", "dynamic-tensor", "dynamic-channel"):
        q = spiq.quantize(model, spiq.QuantConfig(method=method, weight_bits=8, input_bits=8, bias_images=0))
        with torch.no_grad():
            assert mean_logit_sqnr_db(model(images), q(images)) > 25, method
    assert parameter_checksum(model) == before


@pytest.mark.xfail(strict=True, reason="known bug: calibrated ranges on this net give logits unrelated to the "
                                       "float model's (about 0 dB), while the data-free ones give 35 dB")
@pytest.mark.parametrize("method", ["calib-minmax", "calib-mse"])
def test_calibrated_methods_on_the_toy_cnn(toy, method):
    model, images, ref = toy
    q = spiq.quantize(model, spiq.QuantConfig(method=method, bias_images=0, calib_images=5), calib_data=images)
    with torch.no_grad():
        assert mean_logit_sqnr_db(ref, q(images)) > 25


def test_fewer_bits_lose_more(toy):
    db = [_sqnr(toy, method="spiq", input_bits=b) for b in (8, 6, 4)]
    assert db[0] > db[1] > db[2]


def test_int8_export_runs_in_onnx_runtime_as_simulated(toy, tmp_path):
    from spiq.export.runtime import ort_session, run_onnx

    model, pre = toy_cnn(se=False)
    images = torch.stack([pre(open_image(ROOT / "assets" / f"{n}.jpg")) for n in PHOTOS])
    q = spiq.quantize(model, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, bias_images=0,
                                              int8_graph=True))
    report = spiq.export_onnx(q, tmp_path / "toy.onnx", input_size=64)
    assert report.int8_layers
    real = run_onnx(ort_session(report.path), images)
    with torch.no_grad():
        sim = q(images)
    assert mean_logit_sqnr_db(sim, torch.as_tensor(real)) > 25
