"""Models kept in memory for many users at once: each float model loaded once and shared read-only,
its prepared data-free analysis, and a bounded LRU of quantized copies keyed by (model, config).

Every computation that runs a shared model holds `ModelCache.lock`: the analyses attach forward
hooks for a moment, and a hook left on a shared module by one user would see another user's
activations. On a 2-core machine nothing is lost by running one computation at a time.
"""
from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.models.data import IMAGE_EXTENSIONS, Preprocess, load_batch
from spiq.quantize.api import quantize
from spiq.quantize.biasfit import bias_images_for
from spiq.quantize.prepared import Prepared, prepare, prepared_key
from spiq.quantize.report import QuantResult
from spiq.models.registry import load_model


@dataclass(frozen=True)
class Loaded:
    name: str
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]


def config_key(config: QuantConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


class ModelCache:
    def __init__(self, max_quantized: int = 4, calib_dir: str | Path | None = None, calib_images: int = 32):
        self.lock = threading.RLock()
        self.max_quantized = max_quantized
        self.calib_dir = Path(calib_dir) if calib_dir else None
        self.calib_images = calib_images
        self._loaded: dict[str, Loaded] = {}
        self._prepared: dict[tuple, Prepared] = {}
        self._quantized: OrderedDict[tuple[str, str], QuantResult] = OrderedDict()
        self._derived: dict[tuple, object] = {}   # image-independent analyses of the cached models
        self._calib: dict[str, torch.Tensor] = {}
        self._distilling: dict[str, threading.Lock] = {}

    def load(self, name: str) -> Loaded:
        with self.lock:
            if name not in self._loaded:
                model, preprocess, classes = load_model(name)
                for p in model.parameters():
                    p.requires_grad_(False)  # shared read-only; attributions need input gradients only
                self._loaded[name] = Loaded(name, model, preprocess, classes)
            return self._loaded[name]

    def prepared(self, name: str, config: QuantConfig) -> Prepared:
        key = (name, *prepared_key(config))
        with self.lock:
            if key not in self._prepared:
                loaded = self.load(name)
                self._prepared[key] = prepare(loaded.model, config, loaded.preprocess)
            return self._prepared[key]

    def warm(self, name: str, config: QuantConfig | None = None) -> None:
        """Search the data-free ranges of every bit width ahead of the first request (seconds of CPU),
        then the calibrated ones on this cache's calibration images.

        The data-free search runs without the lock: it touches only the data-free laws, never a
        model. The calibration runs the shared float model, so it takes the lock in short turns.
        """
        config = config or QuantConfig()
        prepared = self.prepared(name, config)
        prepared.warm(config)
        if self.calib_dir is not None:
            prepared.warm_calibrated(self.calibration(name), config, lock=self.lock)

    def calibration(self, name: str) -> torch.Tensor:
        """The calib-* methods' images: every image of `calib_dir`, preprocessed for this model."""
        if self.calib_dir is None:
            raise ValueError("this cache has no calibration images (calib_dir)")
        with self.lock:
            if name not in self._calib:
                files = sorted(p for p in self.calib_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                if not files:
                    raise ValueError(f"no calibration images in {self.calib_dir}")
                self._calib[name] = load_batch(files[: self.calib_images], self.load(name).preprocess)
            return self._calib[name]

    def quantized(self, name: str, config: QuantConfig,
                  progress: Callable[[float, str], None] | None = None) -> QuantResult:
        """The quantized copy of model `name` for `config`, shared by everyone who asks for it.

        Cheap to keep: copies made from one prepared model share its weight tensors.
        """
        key = (name, config_key(config))
        with self.lock:
            if key in self._quantized:
                self._quantized.move_to_end(key)
                return self._quantized[key]
        report = progress
        if self.distill(name, config, progress) and progress is not None:
            def report(f, what):
                progress(0.9 + 0.1 * f, what)
        with self.lock:
            if key in self._quantized:   # made by another request meanwhile
                return self._quantized[key]
            loaded = self.load(name)
            calib = self.calibration(name) if config.needs_calibration else None
            q = quantize(loaded.model, config, calib_data=calib, progress=report,
                         prepared=self.prepared(name, config))
            for p in q.model.parameters():
                p.requires_grad_(False)
            self._quantized[key] = q
            while len(self._quantized) > self.max_quantized:
                gone, _ = self._quantized.popitem(last=False)
                self._derived = {k: v for k, v in self._derived.items() if k[:2] != gone}
            return q

    def distill(self, name: str, config: QuantConfig, progress: Callable[[float, str], None] | None = None) -> bool:
        """Make the images config's bias fit needs, if they are not ready, without the shared lock:
        minutes for a model whose images neither ship nor are cached, during which other models'
        requests go on (distilling runs a private copy). Requests for the same model wait for one
        distillation. Whether it distilled (progress went to 0.9)."""
        loaded = self.load(name)
        n = bias_images_for(config, loaded.model)
        if not n:
            return False
        prepared = self.prepared(name, config)
        if prepared.images_ready(n):
            return False
        with self.lock:   # copied while no request has hooks on the shared model
            model_lock = self._distilling.setdefault(name, threading.Lock())
            private = copy.deepcopy(loaded.model)
        # Never wait for the shared lock while holding model_lock: a view holding the shared lock
        # may be waiting for this model's images.
        with model_lock:
            if prepared.images_ready(n):
                return False
            prepared.distilled_images(n, progress, copy_of_source=private)
            return True

    def derived(self, name: str, config: QuantConfig, what: str, compute: Callable[[], object], fresh: bool = False):
        """A result that depends only on (model, config), computed once while that model is cached
        (again when `fresh`: the kept one is gone, e.g. its files were deleted)."""
        key = (name, config_key(config), what)
        with self.lock:
            if fresh or key not in self._derived:
                self._derived[key] = compute()
            return self._derived[key]

    def cached_configs(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self._quantized)
