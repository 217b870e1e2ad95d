"""What quantize() derives from the float model alone, kept across configs: the BN-folded copy,
its data-free input laws and every range searched on them."""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.core.tensors import Range
from spiq.graph.trace import QUANTIZABLE, analyse
from spiq.models.data import Preprocess
from spiq.models.registry import LoadedModel
from spiq.models.vit import VitGraph, tap_attention, vit_graph
from spiq.quantize.biasfit import activated_layers, activated_means
from spiq.quantize.distill import distilled_images, find_distilled
from spiq.ranges.laws import (Dist, Propagation, RangeEffect, calibrated_range, clip_range, law_moments, observe,
                              propagate, range_effect, sigma_range, sorted_samples)
from spiq.ranges.vit import vit_laws
from spiq.transforms.fold import EqualizedPair, equalize, fold_batchnorm

# ImageNet normalisation: the assumption when a model comes without its preprocessing.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# About four whole-model weight sets of a mobile network: enough to flip between a few configs.
_MAX_WEIGHT_PLANS = 200


@dataclass
class Prepared:
    """What quantize() derives from the float model alone, reusable across configs.

    The BN-folded copy, its data-free input laws (which depend only on the tail settings) and the
    ranges chosen from them so far. Re-quantizing with other bits or methods then skips the
    folding, the graph analysis and every range already searched. Shared read-only.

    For a transformer, `folded` is the float copy with its attention written out (TapAttention),
    `vit` its structure and `matmul_laws` the data-free laws of the attention matmuls' operands.
    """
    source: nn.Module
    folded: nn.Module
    propagation: Propagation
    bounds_from: str
    key: tuple                  # prepared_key() of the configs it serves
    preprocess: Preprocess | None = None   # the source's input normalisation and size, if known
    vit: VitGraph | None = None
    matmul_laws: dict[str, Dist] = field(default_factory=dict, repr=False)
    equalized: list[EqualizedPair] = field(default_factory=list)   # config.equalize: the pairs rescaled
    ranges: dict = field(default_factory=dict, repr=False)
    effects: dict = field(default_factory=dict, repr=False)    # RangeEffect of each searched range
    moments: dict = field(default_factory=dict, repr=False)    # law_moments of each layer input
    weights: OrderedDict = field(default_factory=OrderedDict, repr=False)   # bounded: they are big
    calibrated: dict = field(default_factory=dict, repr=False)   # ranges from `calibrated_on`'s images
    calibrated_on: tuple | None = field(default=None, repr=False)
    distilled: dict = field(default_factory=dict, repr=False)   # bias_images -> images distilled from BN
    activations: dict | None = field(default=None, repr=False)   # activated_layers of `folded`, once
    fit_targets: dict = field(default_factory=dict, repr=False)   # bias_images -> activated_means of `folded`

    def cached_weights(self, key, make):
        """Quantized weights of one layer for one setting, made once (methods share unfolded weights)."""
        if key not in self.weights:
            self.weights[key] = make()
            while len(self.weights) > _MAX_WEIGHT_PLANS:
                self.weights.popitem(last=False)
        self.weights.move_to_end(key)
        return self.weights[key]

    @staticmethod
    def _range_key(name: str, bits: int, per_channel: bool, config: QuantConfig) -> tuple:
        rule = (config.range_rule, config.clip_penalty if config.range_rule == "mse" else config.n_sigma)
        return name, bits, per_channel, rule

    def data_free_range(self, name: str, dist: Dist, bits: int, per_channel: bool, config: QuantConfig,
                        sums=None) -> Range:
        key = self._range_key(name, bits, per_channel, config)
        if key not in self.ranges:
            self.ranges[key] = (clip_range(dist, bits, per_channel, config.clip_penalty, sums) if key[3][0] == "mse"
                                else sigma_range(dist, config.n_sigma, per_channel))
        return self.ranges[key]

    def data_free_effect(self, name: str, dist: Dist, bits: int, per_channel: bool, config: QuantConfig) -> RangeEffect:
        """`range_effect` of the data-free range, kept: the fold decision and bias correction read it."""
        key = self._range_key(name, bits, per_channel, config)
        if key not in self.effects:
            self.effects[key] = range_effect(dist, self.data_free_range(name, dist, bits, per_channel, config), bits)
        return self.effects[key]

    def calibrated_ranges(self, images: torch.Tensor, count: int, wanted: dict[str, tuple]) -> dict[str, Range]:
        """Ranges of layers {name: (rule, bits, per_channel, percentile)} calibrated on images[:count].

        Min/max and percentile ranges do not depend on the bits, so they are kept for the same
        images; on any miss every wanted layer is observed again (the random subsample of each
        layer depends on which layers are observed together: the result is a fresh call's)."""
        self._calibrating_on(images, count)
        if any(_calib_key(n, w) not in self.calibrated for n, w in wanted.items()):
            obs = observe(self.folded, list(wanted), images[:count])
            for n, w in wanted.items():
                self.calibrated.setdefault(_calib_key(n, w), calibrated_range(obs[n], *w))
        return {n: self.calibrated[_calib_key(n, w)] for n, w in wanted.items()}

    def _calibrating_on(self, images: torch.Tensor, count: int) -> None:
        if self.calibrated_on is None or self.calibrated_on[0] is not images or self.calibrated_on[1] != count:
            self.calibrated, self.calibrated_on = {}, (images, count)

    def warm_calibrated(self, images: torch.Tensor, config: QuantConfig, bits=range(2, 17), lock=None) -> None:
        """Every layer's per-tensor calibrated ranges (each rule, these input bits) from one observation,
        as a model-wide calib-* config would get them, so that quantize() finds them. `lock` is held
        while the shared float model runs and the kept ranges change (one bit width at a time)."""
        if self.vit is not None:
            return
        lock = lock or contextlib.nullcontext()
        names = quantizable_layers(self.source)
        with lock:
            self._calibrating_on(images, config.calib_images)
            obs = observe(self.folded, names, images[:config.calib_images])
        for b in bits:
            with lock:
                if self.calibrated_on[0] is not images:
                    return
                for rule in ("minmax", "percentile", "mse"):
                    for n in names:
                        w = (rule, b, False, config.percentile)
                        if _calib_key(n, w) not in self.calibrated:
                            self.calibrated[_calib_key(n, w)] = calibrated_range(obs[n], *w)

    def distilled_images(self, n: int, progress: Callable[[float, str], None] | None = None,
                         copy_of_source: nn.Module | None = None) -> torch.Tensor:
        """n images distilled from the source model's BN statistics (disk-cached; kept here too).
        `copy_of_source`: an identical model to distill on where the source may be in use."""
        if n not in self.distilled:
            report = (lambda f, m: progress(0.9 * f, m)) if progress is not None else None
            self.distilled[n] = distilled_images(copy_of_source or self.source, n, *distill_bounds(self.preprocess),
                                                 progress=report)
        return self.distilled[n]

    def fit_targets_for(self, n: int) -> dict[str, torch.Tensor]:
        """What `fit_biases` matches on the n distilled images: the float model's activated means,
        the same for every config (half the fit's cost, computed once)."""
        if self.activations is None:
            self.activations = activated_layers(analyse(self.folded))
        if n not in self.fit_targets:
            self.fit_targets[n] = activated_means(self.folded, self.distilled_images(n), self.activations)
        return self.fit_targets[n]

    def images_ready(self, n: int) -> bool:
        """Whether `distilled_images(n)` comes without distilling (held, shipped or cached)."""
        if n not in self.distilled:
            found = find_distilled(self.source, n, *distill_bounds(self.preprocess))
            if found is None:
                return False
            self.distilled[n] = found
        return True

    def law_moments(self, name: str, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.moments:
            self.moments[name] = law_moments(dist)
        return self.moments[name]

    def warm(self, config: QuantConfig, bits=range(2, 17)) -> None:
        """Search every layer's data-free ranges at these bit widths now, so quantize() finds them."""
        for name, dist in self.propagation.inputs.items():
            sums = sorted_samples(dist) if config.range_rule == "mse" and not dist.use_bounds else None
            self.law_moments(name, dist)
            for b in bits:
                for per_channel in (True, False):
                    self.data_free_range(name, dist, b, per_channel, config, sums)
                    self.data_free_effect(name, dist, b, per_channel, config)


def _calib_key(name: str, wanted: tuple) -> tuple:
    """What a calibrated range depends on: min/max and percentile ranges not on the bits."""
    rule, bits, per_channel, percentile = wanted
    return name, rule, bits if rule == "mse" else None, per_channel, percentile if rule == "percentile" else None


def prepared_key(config: QuantConfig) -> tuple:
    """What a prepared model depends on: the laws' tails and whether the float model was equalized."""
    return config.tail, config.tail_depthwise, config.tail_sum, config.equalize


@torch.no_grad()
def prepare(model: nn.Module | LoadedModel, config: QuantConfig | None = None,
            preprocess: Preprocess | None = None) -> Prepared:
    """Fold BN into a copy of `model` (and equalize it if `config.equalize`), then derive its
    data-free input laws (for `config`'s tails). `model` is what load_model() returned, or a bare
    module with its `preprocess`, which gives the first layer's input range (ImageNet mean/std is
    assumed without it)."""
    if isinstance(model, LoadedModel):
        model, preprocess = model.model, preprocess or model.preprocess
    config = config or QuantConfig()
    lo, hi, bounds_from = input_bounds_of(preprocess)
    vit = vit_graph(model)
    equalized = []
    if vit is not None:  # a transformer has no BatchNorm: its laws start at the LayerNorms
        folded = tap_attention(model)
        prop, matmul_laws = vit_laws(folded, vit, lo, hi, config.tail)
    else:
        folded = copy.deepcopy(model).eval()
        bn_stats = fold_batchnorm(folded, analyse(folded))
        if config.equalize:
            equalized = equalize(folded, analyse(folded), bn_stats)
        prop = propagate(analyse(folded), bn_stats, lo, hi, tail=config.tail, tail_depthwise=config.tail_depthwise,
                         tail_sum=config.tail_sum)
        matmul_laws = {}
    for p in folded.parameters():
        p.requires_grad_(False)
    return Prepared(model, folded, prop, bounds_from, prepared_key(config), preprocess, vit, matmul_laws, equalized)


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def distill_bounds(preprocess: Preprocess | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The normalised input's per-channel bounds and the size images are distilled at."""
    lo, hi, _ = input_bounds_of(preprocess)
    return lo, hi, preprocess.crop if preprocess is not None else 224


def input_bounds_of(pre: Preprocess | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    if pre is not None:
        lo, hi = pre.input_bounds()
        return lo, hi, "preprocess"
    mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
    return -mean / std, (1 - mean) / std, "ImageNet mean/std assumed"


