"""Models kept in memory for many users at once: each float model loaded once and shared read-only,
its quantization memo (folded references, data-free ranges, distilled images), a bounded LRU of quantized copies keyed by (model, config), and a
bounded LRU of computed views keyed by (model, config, image digest, view, options).

Every computation that runs a shared model holds `ModelCache.lock`: the analyses attach forward
hooks for a moment, and a hook left on a shared module by one user would see another user's
activations. On a 2-core machine nothing is lost by running one computation at a time.
"""
from __future__ import annotations

import contextlib
import copy
import json
import threading
from pathlib import Path
from typing import Callable

import torch

from spiq.config import ConfigError, QuantConfig
from spiq.core.lru import LRU
from spiq.models.data import IMAGE_EXTENSIONS, load_batch
from spiq.quantize.api import quantize
from spiq.quantize.biasfit import bias_images_for
from spiq.quantize.memo import Memo
from spiq.quantize.report import QuantResult
from spiq.models.registry import LoadedModel, load_model
from spiq.ui.limits import Footprint, footprint


class PriorityLock:
    """A re-entrant lock that lets urgent waiters in first: a visitor's predictions (a fraction of a
    second of work) go before the next step of another visitor's views, instead of queueing behind
    all of them. Threads mark themselves with `urgent()`."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0
        self._local = threading.local()

    def acquire(self) -> bool:
        me = threading.get_ident()
        urgent = getattr(self._local, "urgent", False)
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            self._urgent_waiting += urgent
            try:
                while self._owner is not None or (self._urgent_waiting and not urgent):
                    self._cond.wait()
            finally:
                self._urgent_waiting -= urgent
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a lock this thread does not hold")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @contextlib.contextmanager
    def urgent(self):
        """Within this block, this thread's acquisitions go before those of threads outside one."""
        before = getattr(self._local, "urgent", False)
        self._local.urgent = True
        try:
            yield
        finally:
            self._local.urgent = before


def config_key(config: QuantConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


class ModelCache:
    """Every store is an `LRU` (`spiq.core.lru`): the quantized models, the views and the slow
    results bounded, the rest (one entry per model, or per quantized model) unbounded."""

    def __init__(self, max_quantized: int = 4, calib_dir: str | Path | None = None, calib_images: int = 32,
                 max_views: int = 64, max_slow: int = 8, distill_inline: bool = True):
        self.lock = PriorityLock()
        # False: a recipe whose bias-fit images are neither shipped nor cached is refused rather than
        # distilled in the request (minutes of CPU, and memory that grows with the image count).
        self.distill_inline = distill_inline
        self.pinned: set[tuple[str, str]] = set()   # (model, config) the LRU never drops: see pin()
        self.max_quantized = max_quantized
        self.max_views = max_views
        self.calib_dir = Path(calib_dir) if calib_dir else None
        self.calib_images = calib_images
        # Per model: the float model, its footprint, its calibration images, the lock of its distillation.
        self._loaded: LRU[LoadedModel] = LRU()
        self._footprints: LRU[Footprint] = LRU()
        self._calib: LRU[torch.Tensor] = LRU()
        self._distilling: LRU[threading.Lock] = LRU()
        self._memos: LRU[Memo] = LRU()
        # Quantized copies, the pinned ones kept; a copy dropped takes its derived analyses with it.
        self._quantized: LRU[QuantResult] = LRU(max_quantized, keep=lambda key: key in self.pinned,
                                                on_drop=self._forget_derived)
        self._derived: LRU[object] = LRU()   # image-independent analyses of the cached models
        # Figures of one request each (~0.1-0.3 MB): bounded by count, whatever the model cache holds.
        self._views: LRU[object] = LRU(max_views)
        self._views_lock = threading.Lock()   # not the model lock: a cached view never waits for a model run
        self.view_computes = 0   # views computed and views answered from the LRU: what tests and
        self.view_hits = 0       # benchmarks read to see that going back to a tab computes nothing
        # Results that take tens of seconds (the advisor's sensitivity tables, ~50 small rows each):
        # the last `max_slow`, each computed by one request while the others asking for it wait.
        self.max_slow = max_slow
        self._slow: LRU[object] = LRU(max_slow)
        self._slow_flights: LRU[threading.Lock] = LRU()

    def _forget_derived(self, quantized_key: tuple[str, str]) -> None:
        self._derived.drop(lambda key: key[:2] != quantized_key)

    def load(self, name: str) -> LoadedModel:
        with self.lock:
            return self._loaded.make(name, lambda: _read_only(load_model(name)))

    def footprint(self, name: str) -> Footprint:
        """Model `name`'s weights and per-image activations, measured once (a forward pass with hooks)."""
        with self.lock:
            loaded = self.load(name)
            return self._footprints.make(name, lambda: footprint(loaded.model, (3, loaded.preprocess.crop,
                                                                                  loaded.preprocess.crop)))

    def memo(self, name: str) -> Memo:
        """Model `name`'s quantization memo: its folded references, ranges and distilled images."""
        with self.lock:
            return self._memos.make(name, lambda: Memo(self.load(name)))

    def warm(self, name: str, config: QuantConfig | None = None) -> None:
        """Search the data-free ranges of every bit width ahead of the first request (seconds of CPU),
        then the calibrated ones on this cache's calibration images.

        The data-free search runs without the lock: it touches only the data-free laws, never a
        model. The calibration runs the shared float model, so it takes the lock in short turns.
        """
        config = config or QuantConfig()
        memo = self.memo(name)
        memo.warm(config)
        if self.calib_dir is not None:
            memo.warm_calibrated(self.calibration(name), config, lock=self.lock)

    def calibration(self, name: str) -> torch.Tensor:
        """The calib-* methods' images: every image of `calib_dir`, preprocessed for this model."""
        if self.calib_dir is None and name not in self._calib:
            raise ValueError("this cache has no calibration images (calib_dir)")
        with self.lock:
            return self._calib.make(name, lambda: self._read_calibration(name))

    def _read_calibration(self, name: str) -> torch.Tensor:
        files = sorted(p for p in self.calib_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no calibration images in {self.calib_dir}")
        return load_batch(files[: self.calib_images], self.load(name).preprocess)

    def use_calibration(self, name: str, images: torch.Tensor) -> None:
        """Calibrate model `name` on these preprocessed images instead of `calib_dir`'s: a report
        shows the model `spiq evaluate` scores, calibrated on the images it draws."""
        with self.lock:
            self._calib[name] = images

    def quantized(self, name: str, config: QuantConfig,
                  progress: Callable[[float, str], None] | None = None) -> QuantResult:
        """The quantized copy of model `name` for `config`, shared by everyone who asks for it.

        Cheap to keep: copies made with one memo share its weight tensors.
        """
        key = (name, config_key(config))
        with self.lock:
            if key in self._quantized:
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
                         memo=self.memo(name))
            for p in q.model.parameters():
                p.requires_grad_(False)
            self._quantized[key] = q   # past max_quantized, drops the least recently used unpinned copy
            return q

    def has_quantized(self, name: str, config: QuantConfig) -> bool:
        with self.lock:
            return (name, config_key(config)) in self._quantized

    def pin(self, name: str, config: QuantConfig) -> None:
        """Keep (name, config) however many other configs are used: every new visitor's first
        predictions use the default recipe, and busy visitors trying recipes must not make each
        new page quantize it again."""
        with self.lock:
            self.pinned.add((name, config_key(config)))

    def fit_ready(self, name: str, config: QuantConfig | None = None) -> bool:
        """Whether config's bias fit (default: the default recipe's) can run without distilling first."""
        config = config or QuantConfig()
        n = bias_images_for(config, self.load(name).model)
        return not n or self.memo(name).images_ready(n)

    def check_fit(self, name: str, config: QuantConfig) -> None:
        """Raise unless config's bias fit can run here: its images ready, or distilled on demand."""
        if not self.distill_inline and not self.fit_ready(name, config):
            n = bias_images_for(config, self.load(name).model)
            raise ConfigError(f"bias_images: the {n} bias-fit images of {name} are not distilled on this server; "
                              "untick Bias fit (bias_images 0), or make them with `spiq distill`")

    def distill(self, name: str, config: QuantConfig, progress: Callable[[float, str], None] | None = None) -> bool:
        """Make the images config's bias fit needs, if they are not ready, without the shared lock:
        minutes for a model whose images neither ship nor are cached, during which other models'
        requests go on (distilling runs a private copy). Requests for the same model wait for one
        distillation. Whether it distilled (progress went to 0.9)."""
        loaded = self.load(name)
        n = bias_images_for(config, loaded.model)
        if not n:
            return False
        memo = self.memo(name)
        if memo.images_ready(n):
            return False
        self.check_fit(name, config)
        with self.lock:   # copied while no request has hooks on the shared model
            model_lock = self._distilling.make(name, threading.Lock)
            private = copy.deepcopy(loaded.model)
        # Never wait for the shared lock while holding model_lock: a view holding the shared lock
        # may be waiting for this model's images.
        with model_lock:
            if memo.images_ready(n):
                return False
            memo.distilled_images(n, progress, copy_of_source=private)
            return True

    def derived(self, name: str, config: QuantConfig, what: str, compute: Callable[[], object], fresh: bool = False,
                locked: bool = True):
        """A result that depends only on (model, config), computed once while that model is cached
        (again when `fresh`: the kept one is gone, e.g. its files were deleted). `locked=False`:
        `compute` takes the lock itself around what runs a shared model, so that long work that
        does not (ONNX Runtime) holds no one up; two requests may then both compute it."""
        key = (name, config_key(config), what)
        with self.lock:
            if not fresh and key in self._derived:
                return self._derived[key]
            if locked:
                self._derived[key] = compute()
                return self._derived[key]
        value = compute()
        with self.lock:
            self._derived[key] = value
        return value

    def cached_view(self, key: tuple) -> tuple[bool, object]:
        """(found, value) of a view computed before, without computing: the cheap path of a request."""
        with self._views_lock:
            if key not in self._views:
                return False, None
            self.view_hits += 1
            return True, self._views[key]

    def view(self, key: tuple, compute: Callable[[], object]):
        """The view `key` names, computed once while among the `max_views` most recently used.

        `compute` runs without the lock (the views take it around each model run), so a cheap
        request can be answered between the steps of an expensive one; two requests for the same
        new view may both compute it, and the second result replaces the first."""
        found, value = self.cached_view(key)
        if found:
            return value
        value = compute()
        with self._views_lock:
            self.view_computes += 1
            self._views[key] = value   # past max_views, drops the least recently used
        return value

    def cached_slow(self, key: tuple) -> tuple[bool, object]:
        """(found, value) of a slow result computed before, without computing."""
        with self._views_lock:
            if key not in self._slow:
                return False, None
            return True, self._slow[key]

    def slow(self, key: tuple, compute: Callable[[], object]):
        """The slow result `key` names, computed once while among the `max_slow` most recently used.

        `compute` runs without the model lock (it takes it around each use of a shared model); a
        second request for the same key waits for the first one's result instead of computing it."""
        found, value = self.cached_slow(key)
        if found:
            return value
        with self._views_lock:
            flight = self._slow_flights.make(key, threading.Lock)
        with flight:
            found, value = self.cached_slow(key)
            if found:
                return value
            value = compute()
            with self._views_lock:
                self._slow[key] = value   # past max_slow, drops the least recently used
                self._slow_flights.pop(key)
        return value

    def view_keys(self) -> list[tuple]:
        """The keys of the views kept, least recently used first: (model, config, image, view, *options)."""
        with self._views_lock:
            return list(self._views)

    def cached_configs(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self._quantized)


def _read_only(loaded: LoadedModel) -> LoadedModel:
    """A float model shared by every user: read-only (attributions need input gradients only)."""
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded
