import copy

import torch
import torchvision
from torch import nn

import spiq
from spiq.transforms.fold import fold_batchnorm
from spiq.graph.trace import analyse
from spiq.core.quant import QuantLayer
from spiq.quantize.memo import Memo, quantizable_layers
from spiq.ranges.laws import propagate


def test_every_lite0_input_has_a_data_free_law(lite0):
    folded = copy.deepcopy(lite0)
    stats = fold_batchnorm(folded, analyse(folded))
    graph = analyse(folded)
    prop = propagate(graph, stats, -torch.ones(3), torch.ones(3))
    assert prop.fallbacks == {}
    assert set(prop.inputs) == set(quantizable_layers(lite0))
    # conv_stem reads the image itself: its law is bounded by the normalisation exactly
    stem = prop.inputs["conv_stem"]
    assert torch.equal(stem.lo, -torch.ones(3)) and torch.equal(stem.hi, torch.ones(3))
    # a depthwise conv reads a ReLU6 output: bounded to [0, 6]
    dw = prop.inputs["blocks.1.0.conv_dw"]
    assert dw.lo.min() >= 0 and dw.hi.max() <= 6
    # the residual stream is signed: its law comes from the BN of the producing projections
    pw = prop.inputs["blocks.2.0.conv_pw"]
    assert (pw.lo < 0).all() and (pw.hi > 0).all()


def test_producers_of_lite0_layers(lite0):
    graph = analyse(lite0)
    producer = {name: layer.input.target for name, layer in graph.layers.items()}
    assert producer["blocks.1.0.conv_dw"] == "blocks.1.0.bn1"        # BatchNormAct2d
    assert producer["conv_stem"] == "x"                                # the graph input
    # residual: block 2.1 adds its projection to block 2.0's output, block 3.0 reads the sum
    assert "add" in str(producer["blocks.3.0.conv_pw"])


def test_se_hardswish_silu_models_are_analysed_without_crash(sample):
    x = sample[0][:2]
    for arch in ("mobilenet_v3_large", "efficientnet_b0", "resnet18"):
        model = torchvision.models.get_model(arch, weights=None).eval()
        config = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, bias_images=2)
        memo = Memo(model)
        memo.hold_distilled(x)   # real images stand in for distilled ones: the graph is what is tested here
        q = spiq.quantize(model, config, memo=memo)
        report = q.report
        assert set(report.layers) == set(quantizable_layers(model))
        assert report.bias_images == 2 and len(report.bias_fit) >= 9, arch   # layers before SiLU/Hardswish/ReLU
        if arch == "resnet18":   # the stem and each block's first conv; the second feeds the residual add
            assert set(report.bias_fit) == {"conv1"} | {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)}
        assert report.fallbacks.get("<input>")  # no preprocess attached: ImageNet stats assumed, and said
        with torch.no_grad():
            assert torch.isfinite(q(x)).all()


class _Odd(nn.Module):
    """A producer the analysis cannot model (a sort) in front of a conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.sort(self.conv1(x), dim=1).values
        return self.conv2(y).mean((2, 3))


def test_unmodelled_producer_falls_back_and_is_reported():
    model = _Odd().eval()
    q = spiq.quantize(model, spiq.QuantConfig())
    assert "conv2" in q.report.fallbacks and q.report.bias_images == 0   # no BatchNorm to distill from
    assert q.report.layers["conv2"].data_free_range_from != "bn"
    assert isinstance(q.model.conv2, QuantLayer)
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(2, 3, 8, 8))).all()
