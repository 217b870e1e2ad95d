import copy

import pytest
import torch
import torchvision

from spiq.fold import fold_batchnorm
from spiq.graph import analyse


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
