"""A small randomly initialised CNN with the blocks of a mobile network, for tests and offline runs
where no weights can be had: conv-BN-ReLU6 stem, inverted residuals with depthwise convs and
squeeze-excitation, a pooled linear classifier.

BatchNorm gains and shifts are drawn per channel with a few wide channels, as in trained networks,
and its running statistics are measured on smooth random images, so the data-free laws describe
its activations and differ across channels as they do on real models. Its predictions mean
nothing; its arithmetic is a real CNN's.
"""
from __future__ import annotations

import torch
from torch import nn

from spiq.models.data import Preprocess


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, se: bool = False):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = _conv_bn(cin, mid)
        self.depthwise = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(mid // 4, 4)) if se else nn.Identity()
        self.project = _conv_bn(mid, cout, act=False)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class ToyCNN(nn.Module):
    def __init__(self, classes: int = 10, se: bool = True):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2, se=se),
                                    InvertedResidual(24, 24, 1, se=se))
        self.head = _conv_bn(24, 64)
        self.classifier = nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


TOY_PREPROCESS = Preprocess(resize=72, crop=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@torch.no_grad()
def toy_cnn(seed: int = 0, classes: int = 10, se: bool = True) -> tuple[nn.Module, Preprocess]:
    """The toy CNN in eval mode, with BatchNorm statistics spread per channel, and its preprocessing
    (`se=False`: without squeeze-excitation, whose product the int8 export does not write)."""
    g = torch.Generator().manual_seed(seed)
    model = ToyCNN(classes, se)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:   # every value from the seed: none from torch's global generator
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            wide = torch.where(torch.rand(c, generator=g) < 0.1, 4.0, 1.0)   # a few wide channels
            m.weight.copy_((0.5 + torch.rand(c, generator=g)) * wide)
            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            m.momentum = None   # a plain average over the batches below
    model.train()
    for _ in range(4):
        coarse = torch.randn(16, 3, 8, 8, generator=g)   # smooth images: nearby pixels agree, as in photos
        model(nn.functional.interpolate(coarse, size=64, mode="bilinear", align_corners=False))
    return model.eval(), TOY_PREPROCESS
