import copy

import pytest
import torch
import torchvision

import spiq
from spiq.analysis.evaluate import predict
from spiq.transforms.fold import ChannelReLU6, fold_batchnorm
from spiq.graph.trace import analyse
from spiq.core.quant import QuantLayer
from spiq.quantize.memo import Memo


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def test_folding_lite0_is_exact(lite0, sample):
    images, _ = sample
    folded = copy.deepcopy(lite0)
    stats = fold_batchnorm(folded, analyse(folded))
    assert len(stats) == 49  # every conv of EfficientNet-Lite0 is followed by a BN
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = images[:16]
    assert _rel(lite0(x), folded(x)) < 1e-5


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
@torch.no_grad()
def test_folding_torchvision_architectures_is_exact(arch, sample):
    model = _randomise_bn(torchvision.models.get_model(arch, weights=None))
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, analyse(folded))
    x = sample[0][:4]
    assert _rel(model(x), folded(x)) < 1e-5


@torch.no_grad()
def test_equalization_is_exact_and_balances_the_weights(lite0, sample, lite0_loaded):
    memo = Memo(lite0_loaded)
    prepared = memo.reference(spiq.QuantConfig(equalize=True))
    plain = memo.reference(spiq.QuantConfig())
    eq = prepared.folded
    # pointwise -> depthwise -> pointwise in each block, through ReLU6s that now cap per channel
    assert len(prepared.equalized) == 34
    assert sum(isinstance(m, ChannelReLU6) for m in eq.modules()) == 32
    x = sample[0][:16]
    assert _rel(lite0(x), eq(x)) < 1e-5

    def spread(w):   # widest output channel's weight range over the median one
        r = w.abs().flatten(1).amax(1)
        return float(r.max() / r.median())

    before = torch.tensor([spread(plain.folded.get_submodule(p.producer).weight) for p in prepared.equalized])
    after = torch.tensor([spread(eq.get_submodule(p.producer).weight) for p in prepared.equalized])
    assert after.median() < before.median() / 2 and after.max() < before.max() / 4
    # the data-free laws follow the rescaled channels: SPIQ's per-channel grids scale with them
    name = "blocks.1.0.conv_dw"
    d0, d1 = plain.propagation.inputs[name], prepared.propagation.inputs[name]
    s = d0.std / d1.std
    assert not torch.allclose(s, torch.ones_like(s), atol=0.1)
    torch.testing.assert_close(d1.mean * s, d0.mean)


@torch.no_grad()
def test_equalization_rescues_per_tensor_weights_and_not_spiq(lite0, subset, lite0_loaded):
    x, _, fp_top1 = subset
    w4 = dict(method="static-tensor", weight_bits=4, input_bits=8, weight_granularity="tensor")
    agree = {eq: float((predict(spiq.quantize(lite0_loaded, spiq.QuantConfig(**w4, equalize=eq)), x) == fp_top1)
                       .float().mean()) for eq in (False, True)}
    # 4-bit per-tensor weights: depthwise kernels of very different ranges share one grid
    assert agree[False] < 0.05 and agree[True] > 0.3
    # SPIQ folds each input channel's step into its column and quantizes per output channel: a
    # channel's scale cancels out, and the integer weights are the same with or without it (but
    # for a float tie here and there)
    cfg = dict(method="spiq", weight_bits=4, input_bits=4, fold="always")
    a = spiq.quantize(lite0_loaded, spiq.QuantConfig(**cfg))
    b = spiq.quantize(lite0_loaded, spiq.QuantConfig(**cfg, equalize=True))
    same = total = 0
    for name, m in a.model.named_modules():
        if isinstance(m, QuantLayer):
            same += int((m.weight_codes == b.model.get_submodule(name).weight_codes).sum())
            total += m.weight_codes.numel()
    assert same / total > 0.999
