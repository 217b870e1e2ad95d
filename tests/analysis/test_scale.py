"""Evaluation at scale: streamed from a folder through a DataLoader, on a chosen device. The number
of workers and the batch size change nothing in the result; a missing GPU is refused before any
work; a quantized model moves whole to another device (its quantizers' scales included)."""
import shutil
from pathlib import Path

import pytest
import torch

import imagenet_layouts as layouts
from spiq import QuantConfig
from spiq.analysis import evaluate as ev
from spiq.analysis.evaluate import evaluate_folder, load_images, predict
from spiq.core.devices import DeviceError, on_device, resolve_device
from spiq.core.quant import ActQuant, QuantLayer
from spiq.models.toy import toy_cnn
from spiq.quantize.api import quantize

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [ROOT / "assets" / n for n in ("cat.jpg", "coffee.jpg", "rocket.jpg", "camera.jpg", "palace.jpg",
                                         "astronaut.jpg")]
NO_GPU = "no CUDA device here (torch.cuda.is_available() is False)"
W8A4 = QuantConfig(method="spiq", weight_bits=8, input_bits=4)


def _photos(folder: Path, n: int) -> Path:
    """n copies of the shipped photos, each under a synset name."""
    folder.mkdir()
    for i in range(n):
        shutil.copy(PHOTOS[i % len(PHOTOS)], folder / f"{layouts.VAL_SYNSETS[i % 6]}_{i:03d}.jpg")
    return folder


def _numbers(r):
    return r.n_images, r.top1, r.top1_fp, r.agreement


def test_workers_and_batch_size_change_no_prediction(tmp_path, lite0_loaded):
    """30 images: batches of 25 (the default) and of 32 cut them differently."""
    folder = _photos(tmp_path / "imgs", 30)
    name = "efficientnet_lite0"
    images, labels, _ = load_images(folder, lite0_loaded.preprocess, workers=2, batch_size=7)
    q = quantize(lite0_loaded, W8A4)   # once: evaluate() would quantize again, to the same model
    in_memory = predict(q, images), predict(lite0_loaded.model, images)
    default = evaluate_folder(name, folder, W8A4, float_model=lite0_loaded, quantized=q)
    scaled = evaluate_folder(name, folder, W8A4, float_model=lite0_loaded, quantized=q, workers=2, batch_size=32)
    assert torch.equal(default.predictions, in_memory[0])
    assert default.top1_fp == (in_memory[1] == labels).float().mean().item()
    assert default.agreement == (in_memory[0] == in_memory[1]).float().mean().item()
    assert torch.equal(scaled.predictions, default.predictions)
    assert _numbers(scaled) == _numbers(default) and default.n_images == 30
    assert (scaled.method, scaled.wbits, scaled.abits) == ("spiq", 8, 4)
    assert 0.8 <= scaled.agreement <= 1.0


def test_every_layout_evaluates_the_same(tmp_path, monkeypatch, lite0_loaded):
    layouts.without_checksums(monkeypatch)
    results = {}
    for layout in layouts.LAYOUTS:
        root = layouts.build(layout, tmp_path / layout, sources=PHOTOS)
        results[layout] = evaluate_folder("efficientnet_lite0", root, None, float_model=lite0_loaded, workers=2)
    first = results[layouts.LAYOUTS[0]]
    for r in results.values():
        assert _numbers(r) == _numbers(first) and r.n_images == 6
    # each layout lists the images in its own order: the same predictions as a multiset
    assert all(sorted(r.predictions.tolist()) == sorted(first.predictions.tolist()) for r in results.values())


def test_a_missing_gpu_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a machine with one
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match=f"^--device cuda: {NO_GPU.replace('(', '.').replace(')', '.')}"):
        resolve_device("cuda", "--device")
    with pytest.raises(DeviceError, match="'tpu' is not a device: give auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="device mps: only auto, cpu, cuda are supported"):
        resolve_device("mps")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the device was checked")
    monkeypatch.setattr(ev, "load_model", no_work)
    monkeypatch.setattr(ev, "find_images", no_work)
    with pytest.raises(DeviceError, match="no CUDA device here"):
        evaluate_folder("efficientnet_lite0", tmp_path, W8A4, device="cuda")


@pytest.mark.parametrize("config", [W8A4.replace(bias_images=0),   # no distillation: the toy ships no images
                                    QuantConfig(method="dynamic-tensor", weight_bits=8, input_bits=8)],
                         ids=["static", "dynamic"])
def test_a_quantized_model_moves_whole_to_another_device(config):
    """On the meta device (what CPU-only CI has besides the CPU), any tensor left behind on the CPU
    would make the forward pass fail: the quantizers' scales, which are not buffers, included."""
    model, pre = toy_cnn()
    q = quantize(model, config, preprocess=pre)
    meta = on_device(q.model, torch.device("meta"))
    assert meta is not q.model and next(q.model.parameters()).device.type == "cpu"   # the caller's copy stays
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    quants = [m.input_quant for m in meta.modules() if isinstance(m, QuantLayer)]
    quants += [m.quant for m in meta.modules() if isinstance(m, ActQuant)]
    assert quants and all(qq.scale is None or (qq.scale.is_meta and qq.zero.is_meta) for qq in quants)
    y = meta(torch.empty(2, 3, pre.crop, pre.crop, device="meta"))
    assert y.is_meta and y.shape == (2, 10)
    assert on_device(q.model, torch.device("cpu")) is q.model


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_gives_the_cpus_predictions(tmp_path, lite0_loaded):
    folder = _photos(tmp_path / "imgs", 12)
    cpu = evaluate_folder("efficientnet_lite0", folder, W8A4, float_model=lite0_loaded, device="cpu")
    gpu = evaluate_folder("efficientnet_lite0", folder, W8A4, float_model=lite0_loaded, device="cuda", workers=2)
    assert next(lite0_loaded.model.parameters()).device.type == "cpu"   # evaluated on a copy
    assert gpu.top1_fp == cpu.top1_fp and (gpu.predictions == cpu.predictions).float().mean() >= 0.9
    images, _, _ = load_images(folder, lite0_loaded.preprocess)
    assert torch.equal(predict(lite0_loaded.model, images, device="cuda"), predict(lite0_loaded.model, images))
