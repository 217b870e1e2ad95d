"""What quantizing one float model derives from it alone, kept across configs and keyed by the
specs it was made from: the BN-folded reference and its laws (per `LawSpec`), every range, weight
set and search the methods asked for, calibration ranges, distilled images."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.core.lru import LRU
from spiq.graph.trace import QUANTIZABLE, analyse
from spiq.methods.registry import METHODS
from spiq.models.data import Preprocess
from spiq.models.registry import LoadedModel
from spiq.models.vit import VitGraph, tap_attention, vit_graph
from spiq.quantize.biasfit import activated_layers, activated_means
from spiq.quantize.distill import distilled_images, find_distilled
from spiq.ranges.laws import Dist, Propagation, observe, propagate
from spiq.ranges.vit import vit_laws
from spiq.transforms.fold import EqualizedPair, equalize, fold_batchnorm

T = TypeVar("T")
# ImageNet normalisation: the assumption when a model comes without its preprocessing.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# About four whole-model weight sets of a mobile network: enough to flip between a few configs.
MAX_WEIGHT_SETS = 200


@dataclass(frozen=True)
class LawSpec:
    """What the folded reference and its data-free laws depend on: the tails, and equalization."""
    tail: str
    tail_depthwise: str | None
    tail_sum: str | None
    equalize: bool

    @classmethod
    def of(cls, config: QuantConfig) -> LawSpec:
        return cls(config.tail, config.tail_depthwise, config.tail_sum, config.equalize)


@dataclass(frozen=True, eq=False)
class Reference:
    """The float model quantization starts from, and where its inputs lie without data.

    `folded` is a BN-folded copy (equalized when asked), or for a transformer the float copy with
    its attention written out (TapAttention), `vit` its structure and `matmul_laws` the laws of its
    attention matmuls' operands. Shared and read-only."""
    folded: nn.Module
    propagation: Propagation
    bounds_from: str              # "preprocess", or the assumption made without it
    vit: VitGraph | None = None
    matmul_laws: dict[str, Dist] | None = None
    equalized: tuple[EqualizedPair, ...] = ()


class _Scoped:
    """The memo seen through one LawSpec: what depends on the laws is kept apart per spec."""

    def __init__(self, memo: Memo, scope: LawSpec):
        self._memo, self._scope = memo, scope

    def __call__(self, key: Hashable, make: Callable[[], T]) -> T:
        return self._memo(("law", self._scope, key), make)

    def weights(self, key: Hashable, make: Callable[[], T]) -> T:
        return self._memo.weights(("law", self._scope, key), make)


class Memo:
    """What quantize() derives from one float model, reusable across configs (pass it as
    `quantize(..., memo=memo)`): re-quantizing with other bits or methods then skips the folding,
    the graph analysis, and every range, weight set and search made before. Not thread-safe: its
    owner serialises the quantizations that share it."""

    def __init__(self, model: nn.Module | LoadedModel, preprocess: Preprocess | None = None,
                 max_weight_sets: int = MAX_WEIGHT_SETS):
        if isinstance(model, LoadedModel):
            model, preprocess = model.model, preprocess or model.preprocess
        self.source, self.preprocess = model, preprocess
        self._store: LRU = LRU()
        self._weights: LRU = LRU(max_weight_sets)   # big: the least recently used go

    def __call__(self, key: Hashable, make: Callable[[], T]) -> T:
        return self._store.make(key, make)

    def weights(self, key: Hashable, make: Callable[[], T]) -> T:
        return self._weights.make(key, make)

    def scoped(self, config: QuantConfig) -> _Scoped:
        """The memo the methods see for `config`: keyed apart per LawSpec."""
        return _Scoped(self, LawSpec.of(config))

    def reference(self, config: QuantConfig) -> Reference:
        """The folded float model and its laws for config's LawSpec, made once."""
        spec = LawSpec.of(config)
        return self(("reference", spec), lambda: _reference(self.source, spec, self.preprocess))

    # --- calibration ----------------------------------------------------------------------------
    def calibrated(self, config: QuantConfig, images: torch.Tensor, count: int,
                   wanted: dict[str, Hashable]) -> dict:
        """The ranges of `wanted` (layer -> calibration spec) on images[:count].

        Kept for the last images only. On any miss every wanted layer is observed again (the random
        subsample of each layer depends on which layers are observed together: the result is a
        fresh call's)."""
        kept = self._calibration_store(config, images, count)
        if any((n, w) not in kept for n, w in wanted.items()):
            obs = observe(self.reference(config).folded, list(wanted), images[:count])
            for n, w in wanted.items():
                kept.setdefault((n, w), w.measure(obs[n]))
        return {n: kept[n, w] for n, w in wanted.items()}

    def _calibration_store(self, config: QuantConfig, images: torch.Tensor, count: int) -> dict:
        key = ("calibrated", LawSpec.of(config), id(images), count)
        self._store.drop(lambda k: k[0] != "calibrated" or k == key)
        # the images are held with their ranges, so their id is not reused while the ranges are kept
        return self(key, lambda: (images, {}))[1]

    def warm_calibrated(self, images: torch.Tensor, config: QuantConfig, bits=range(2, 17), lock=None) -> None:
        """Every layer's per-tensor calibrated ranges (each calib-* method, these input bits) from one
        observation, as a model-wide calib-* config would get them, so that quantize() finds them.
        `lock` is held while the shared float model runs and the kept ranges change."""
        reference = self.reference(config)
        if reference.vit is not None:
            return
        lock = lock or contextlib.nullcontext()
        names = quantizable_layers(self.source)
        calibrating = [m for m in METHODS.values() if m.calibration is not None]
        with lock:
            kept = self._calibration_store(config, images, config.calib_images)
            obs = observe(reference.folded, names, images[:config.calib_images])
        for b in bits:
            with lock:
                for m in calibrating:
                    spec = m.calibration(b, False, config)
                    for n in names:
                        kept.setdefault((n, spec), spec.measure(obs[n]))

    # --- the data-free ranges, ahead of requests --------------------------------------------------
    def warm(self, config: QuantConfig, bits=range(2, 17)) -> None:
        """Search every layer's data-free ranges (and what they do to its law) at these bit widths
        now, by each method that searches them (Method.warm), so that quantize() finds them."""
        reference, scope = self.reference(config), self.scoped(config)
        for warm in dict.fromkeys(m.warm for m in METHODS.values() if m.warm is not None):
            for name, dist in reference.propagation.inputs.items():
                warm(scope, name, dist, config, bits)

    # --- distilled images ----------------------------------------------------------------------
    def distilled_images(self, n: int, progress: Callable[[float, str], None] | None = None,
                         copy_of_source: nn.Module | None = None) -> torch.Tensor:
        """n images distilled from the source model's BN statistics (disk-cached; kept here too).
        `copy_of_source`: an identical model to distill on where the source may be in use."""
        def make():
            report = (lambda f, m: progress(0.9 * f, m)) if progress is not None else None
            return distilled_images(copy_of_source or self.source, n, *distill_bounds(self.preprocess),
                                    progress=report)

        return self(("distilled", n), make)

    def hold_distilled(self, images: torch.Tensor) -> None:
        """Take `images` as the len(images) distilled images (real ones standing in, in a test)."""
        self._store[("distilled", len(images))] = images

    def images_ready(self, n: int) -> bool:
        """Whether `distilled_images(n)` comes without distilling (held, shipped or cached)."""
        if ("distilled", n) in self._store:
            return True
        found = find_distilled(self.source, n, *distill_bounds(self.preprocess))
        if found is not None:
            self(("distilled", n), lambda: found)
        return found is not None

    def fit_targets(self, config: QuantConfig, n: int) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
        """The layers the bias fit corrects, and what it matches on the n distilled images: the float
        model's activated means, the same for every config (half the fit's cost, computed once)."""
        scope, folded = self.scoped(config), self.reference(config).folded
        activations = scope("activated layers", lambda: activated_layers(analyse(folded)))
        means = scope(("activated means", n), lambda: activated_means(folded, self.distilled_images(n), activations))
        return activations, means


@torch.no_grad()
def _reference(model: nn.Module, spec: LawSpec, preprocess: Preprocess | None) -> Reference:
    """Fold BN into a copy of `model` (and equalize it if asked), then derive its data-free input laws."""
    lo, hi, bounds_from = input_bounds_of(preprocess)
    vit = vit_graph(model)
    equalized = []
    if vit is not None:  # a transformer has no BatchNorm: its laws start at the LayerNorms
        folded = tap_attention(model)
        prop, matmul_laws = vit_laws(folded, vit, lo, hi, spec.tail)
    else:
        folded = copy.deepcopy(model).eval()
        bn_stats = fold_batchnorm(folded, analyse(folded))
        if spec.equalize:
            equalized = equalize(folded, analyse(folded), bn_stats)
        prop = propagate(analyse(folded), bn_stats, lo, hi, tail=spec.tail, tail_depthwise=spec.tail_depthwise,
                         tail_sum=spec.tail_sum)
        matmul_laws = {}
    for p in folded.parameters():
        p.requires_grad_(False)
    return Reference(folded, prop, bounds_from, vit, matmul_laws, tuple(equalized))


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
