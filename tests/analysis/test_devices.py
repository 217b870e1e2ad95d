"""The analysis functions run where the model is and give CPU results, the same numbers on any device.

On a CPU-only machine the CUDA bug class is caught with the default device set to "meta": a tensor
the code creates without following the data lands there, and meeting the CPU data it raises (or,
indexing it, reads garbage, which the comparison with the plain run catches). On a GPU the same
functions run on CUDA against their CPU results.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.nn import functional as F

import spiq
from spiq.analysis import attribution, examples, law, layers, sensitivity
from spiq.analysis.advise import advise
from spiq.core.devices import on_device
from spiq.models.registry import LoadedModel
from spiq.models.toy import toy_cnn
from spiq.models.vit import toy_vit

NO_GPU = "no CUDA device on this machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]
CONFIG = spiq.QuantConfig(weight_bits=8, input_bits=4, bias_images=0)   # no distillation: nothing ships for the toy
LAYER = "blocks.1.expand.0"   # reads the residual stream: a per-channel law from BatchNorm statistics


@dataclasses.dataclass
class Scene:
    loaded: LoadedModel
    q: spiq.QuantResult
    static: spiq.QuantResult
    x: torch.Tensor
    vit: torch.nn.Module
    vq: spiq.QuantResult
    vx: torch.Tensor

    def on(self, device: str) -> Scene:
        """Models and images on `device`: copies, the report (its ranges, laws, reference) as it is."""
        def moved(q):
            return dataclasses.replace(q, model=on_device(q.model, torch.device(device)))
        return Scene(self.loaded._replace(model=on_device(self.loaded.model, torch.device(device))), moved(self.q),
                     moved(self.static), self.x.to(device), on_device(self.vit, torch.device(device)), moved(self.vq),
                     self.vx.to(device))


@pytest.fixture(scope="module")
def scene() -> Scene:
    model, pre = toy_cnn()
    loaded = LoadedModel(model, pre, [f"class {i}" for i in range(10)])
    gen = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(2, 3, 8, 8, generator=gen), size=pre.crop, mode="bilinear", align_corners=False)
    vit, vpre = toy_vit()
    vq = spiq.quantize(vit, spiq.QuantConfig(weight_bits=8, input_bits=8, bias_images=0), preprocess=vpre)
    return Scene(loaded, spiq.quantize(loaded, CONFIG), spiq.quantize(loaded, CONFIG.replace(method="static-tensor")),
                 x, vit, vq, torch.randn(1, 3, 224, 224, generator=gen))


# every public analysis function that reads a model or images, on a scene
CALLS = {
    "layer_breakdown": lambda s: layers.layer_breakdown(s.loaded.model, s.q, s.x),
    "layer_sqnr": lambda s: layers.layer_sqnr(s.loaded.model, s.q, s.x),
    "channel_ranges": lambda s: layers.channel_ranges(s.loaded.model, s.q, LAYER, s.x),
    "channel_spread": lambda s: layers.channel_spread(s.q, 6),
    "fold_cost": lambda s: layers.fold_cost(s.loaded.model, s.q),
    "compare_predictions": lambda s: layers.compare_predictions(s.loaded.model, s.q, s.x[0], s.loaded.classes),
    "error_maps": lambda s: layers.error_maps(s.loaded.model, s.q, s.x[0]),
    "error_maps_vit": lambda s: layers.error_maps(s.vit, s.vq, s.vx[0]),
    "attention_maps": lambda s: layers.attention_maps(s.vit, s.vq, s.vx[0]),
    "integrated_gradients": lambda s: attribution.attribution_drift(s.loaded.model, s.q, s.x[0]),
    "grad_cam": lambda s: attribution.attribution_drift(s.loaded.model, s.q, s.x[0], "grad-cam"),
    "grad_cam_vit": lambda s: attribution.attribution_drift(s.vit, s.vq, s.vx[0], "grad-cam"),
    "law_vs_reality": lambda s: law.law_vs_reality(s.q, s.x, LAYER),
    "score_example": lambda s: examples.score_example(s.loaded, "x", s.x[0], s.q, s.static),
    "sensitivity": lambda s: sensitivity.sensitivity(s.loaded, CONFIG, (4, 8), images=s.x),
}
# quantize() runs on the CPU (prepare's laws start from the preprocess's CPU bounds): sensitivity()
# takes the model there and runs its probes on the device it is given
ON_DEVICES = [name for name in CALLS if name != "sensitivity"]


@contextlib.contextmanager
def default_device(device):
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


@contextlib.contextmanager
def meta_within(model: torch.nn.Module):
    """The default device "meta" inside `model`'s forward passes only."""
    hooks = [model.register_forward_pre_hook(lambda *_: torch.set_default_device("meta")),
             model.register_forward_hook(lambda *_: torch.set_default_device("cpu"))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture
def spiq_code_only(monkeypatch):
    """Outside spiq's analysis code the default device is the CPU's: captum's Integrated Gradients
    makes its step sizes with torch.tensor() and moves them to the gradients' device (fine on CUDA,
    no data on meta), so only the model's forward passes run under meta there; quantize() (which
    sensitivity() calls) is not made device-generic here."""
    from captum.attr import IntegratedGradients

    real_ig, real_quantize = IntegratedGradients.attribute, sensitivity.quantize

    def ig(self, *args, **kwargs):
        with default_device("cpu"), meta_within(self.forward_func):
            return real_ig(self, *args, **kwargs)

    def quantize(*args, **kwargs):
        with default_device("cpu"):
            return real_quantize(*args, **kwargs)

    monkeypatch.setattr(IntegratedGradients, "attribute", ig)
    monkeypatch.setattr(sensitivity, "quantize", quantize)


def flat(result) -> list:
    """The numbers and tensors of a result, in order: dataclasses, dicts, lists, tuples opened up."""
    if dataclasses.is_dataclass(result):
        return [v for f in dataclasses.fields(result) if f.name != "law" for v in flat(getattr(result, f.name))]
    if isinstance(result, dict):
        return [v for k in result for v in [k, *flat(result[k])]]
    if isinstance(result, (list, tuple)):
        return [v for item in result for v in flat(item)]
    return [result]


def assert_same(a, b, exact: bool) -> None:
    va, vb = flat(a), flat(b)
    assert len(va) == len(vb)
    for x, y in zip(va, vb):
        if isinstance(x, torch.Tensor):
            assert y.device.type == "cpu" and x.shape == y.shape and x.dtype == y.dtype
            assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)
        elif isinstance(x, float) and not exact:
            assert y == pytest.approx(x, rel=1e-4, abs=1e-5, nan_ok=True)
        else:
            assert x == y or (x != x and y != y)   # NaN equals NaN here


@pytest.mark.parametrize("name", list(CALLS))
def test_nothing_is_made_on_the_default_device(scene, name, spiq_code_only):
    """Model and images on the CPU, the default device elsewhere: the very numbers of the plain run."""
    plain = CALLS[name](scene)
    with default_device("meta"):
        moved = CALLS[name](scene)
    assert_same(plain, moved, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ON_DEVICES)
def test_the_device_gives_the_cpus_numbers_on_the_cpu(scene, name, device):
    assert_same(CALLS[name](scene), CALLS[name](scene.on(device)), exact=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_sensitivity_probes_on_the_device_it_is_given(scene, device):
    def table(on):
        return sensitivity.sensitivity(scene.loaded, CONFIG, (4, 8), images=scene.x, device=on)
    assert_same(table("cpu"), table(device), exact=device == "cpu")


def test_the_shared_reference_is_copied_to_the_models_device_not_moved(scene):
    reference = scene.q.report.reference
    assert layers.reference_of(scene.loaded.model, scene.q) is reference   # on its device: no copy
    elsewhere = dataclasses.replace(scene.q, model=on_device(scene.q.model, torch.device("meta")))
    copy = layers.reference_of(scene.loaded.model, elsewhere)
    assert copy is not reference and {t.device.type for t in copy.parameters()} == {"meta"}
    assert {t.device.type for t in reference.parameters()} == {"cpu"}


def test_advise_reads_only_the_table(scene):
    """advise() takes numbers: the sensitivity table, whatever device it was measured on."""
    table = CALLS["sensitivity"](scene)
    with default_device("meta"):
        advice = advise(table, CONFIG, 6.0, (4, 8))
    assert advice == advise(table, CONFIG, 6.0, (4, 8))
