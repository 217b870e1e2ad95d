"""Images distilled from BatchNorm statistics, and the bias correction fitted on them."""
import copy

import pytest
import torch
from torch import nn

import spiq
from spiq.models.registry import get_spec
from conftest import LITES
from spiq.quantize import distill
from spiq.core.metrics import parameter_checksum
from spiq.core.metrics import mean_logit_sqnr_db
from spiq.graph.trace import analyse
from spiq.quantize.biasfit import activated_layers
from spiq.quantize.memo import Memo, distill_bounds, input_bounds_of, quantizable_layers


def _bn_gap(model: nn.Module, x: torch.Tensor) -> float:
    """Sum over BatchNorms of how far the batch is from their running statistics."""
    gaps = []

    def hook(bn, args, _out):
        gaps.append(float(distill.batchnorm_gap(bn, args[0])))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(gaps)


@pytest.mark.slow   # a heavy end-to-end job
def test_distilled_images_take_on_the_batchnorm_statistics(lite0, lite0_loaded):
    lo, hi, _ = input_bounds_of(lite0_loaded.preprocess)
    before = parameter_checksum(lite0)
    start = distill.distill_images(lite0, 2, lo, hi, steps=0)
    x = distill.distill_images(lite0, 2, lo, hi, steps=30)
    assert parameter_checksum(lite0) == before and lite0.training is False
    assert x.shape == (2, 3, 224, 224) and not x.requires_grad
    assert (x >= lo.view(1, -1, 1, 1)).all() and (x <= hi.view(1, -1, 1, 1)).all()
    assert _bn_gap(lite0, x) < 0.5 * _bn_gap(lite0, start)
    assert torch.equal(x, distill.distill_images(lite0, 2, lo, hi, steps=30))   # seeded


def test_distilled_images_are_cached_on_disk_as_png(lite0, tmp_path, monkeypatch, lite0_loaded):
    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))
    lo, hi, _ = input_bounds_of(lite0_loaded.preprocess)
    first = distill.distilled_images(lite0, 2, lo, hi, steps=3)
    (folder,) = (tmp_path / "distilled").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    # on the 8-bit grid already, so the first run and the later ones fit on the same images
    assert torch.equal(distill.from_pixels(distill.to_pixels(first, lo, hi), lo, hi), first)

    def no_distilling(*_a, **_k):
        raise AssertionError("distilled again instead of read from the cache")
    with monkeypatch.context() as m:
        m.setattr(distill, "distill_images", no_distilling)
        assert torch.equal(distill.distilled_images(lite0, 2, lo, hi, steps=3), first)
    # another model (one weight changed) gets its own images
    other = copy.deepcopy(lite0)
    with torch.no_grad():
        other.conv_stem.weight[0, 0, 0, 0] += 1.0
    distill.distilled_images(other, 2, lo, hi, steps=3)
    assert len(list((tmp_path / "distilled").iterdir())) == 2
    # a damaged or missing image is made again, not trusted
    (folder / "1.png").write_bytes(b"not an image")
    assert torch.equal(distill.distilled_images(lite0, 2, lo, hi, steps=3), first)
    (folder / "0.png").unlink()
    assert torch.equal(distill.distilled_images(lite0, 2, lo, hi, steps=3), first)


def test_activated_layers_are_those_before_an_activation(lite0, lite0_loaded):
    folded = spiq.quantize(lite0_loaded, spiq.QuantConfig()).report.reference
    acts = activated_layers(analyse(folded))
    assert set(acts) == {n for n in quantizable_layers(lite0)
                         if n.endswith(("conv_stem", "conv_dw", "conv_head")) or
                         (n.endswith("conv_pw") and not n.startswith("blocks.0."))}
    assert all(isinstance(a, nn.ReLU6) for a in acts.values())


def test_bias_fit_on_distilled_images_lowers_the_error_on_real_images(lite0, subset, lite0_loaded):
    x, _, _ = subset
    with torch.no_grad():
        fp = lite0(x)
    law = spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=5, bias_images=0))
    fitted = spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=5))   # automatic: 8 images
    assert fitted.report.bias_images == 8 and law.report.bias_images == 0
    with torch.no_grad():
        gain = mean_logit_sqnr_db(fp, fitted(x)) - mean_logit_sqnr_db(fp, law(x))
    assert gain > 0.2, f"the distilled bias fit gained only {gain:.2f} dB of logit SQNR on real images"
    acts = activated_layers(analyse(law.report.reference))
    for name in quantizable_layers(lite0):
        same = torch.equal(law.model.get_submodule(name).layer.bias, fitted.model.get_submodule(name).layer.bias)
        assert same == (name not in acts), name   # residual branches and logits keep the law's bias


def test_the_default_models_images_ship_with_the_package(lite0, tmp_path, monkeypatch, lite0_loaded):
    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))   # an empty cache, as on a fresh Space

    def no_distilling(*_a, **_k):
        raise AssertionError("distilled instead of read from the package")
    monkeypatch.setattr(distill, "distill_images", no_distilling)
    x = Memo(lite0_loaded).distilled_images(8)
    lo, hi, _ = distill_bounds(lite0_loaded.preprocess)
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    assert (x >= lo.view(1, -1, 1, 1)).all() and (x <= hi.view(1, -1, 1, 1)).all()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert _bn_gap(lite0, x) < 0.2 * _bn_gap(lite0, noise)   # 111 against 1062
    assert not list(tmp_path.rglob("*.png"))   # nothing written to the cache either


def test_every_embedded_models_images_ship_with_the_package(lite, tmp_path, monkeypatch):
    """Found by their key (the weights' checksum, the size, the bounds) in the package, not made."""
    name, model = lite
    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))
    lo, hi, size = distill_bounds(get_spec(name).preprocess)
    assert size == LITES[name]
    x = distill.find_distilled(model, 8, lo, hi, size)
    assert x is not None and x.shape == (8, 3, size, size)
    assert (distill.SHIPPED / distill.image_key(model, 8, lo, hi, size)).is_dir()
    assert not list(tmp_path.rglob("*.png"))   # the cache is left alone


def test_bias_images_without_batchnorm_fall_back_and_say_so(vit):
    q = spiq.quantize(vit, spiq.QuantConfig(method="static-tensor", bias_images=4))
    assert "BatchNorm" in q.report.fallbacks["<bias_images>"]
    auto = spiq.quantize(vit, spiq.QuantConfig(method="static-tensor"))   # automatic: nothing to fit on
    assert "<bias_images>" not in auto.report.fallbacks and auto.report.bias_images == 0


def test_a_model_without_batchnorm_cannot_be_distilled(vit):
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        distill.distill_images(vit, 1, torch.zeros(3), torch.ones(3), steps=1)
