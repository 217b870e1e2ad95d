"""A sweep: models × methods × (weight bits, input bits) evaluated on one labelled folder, one JSON
file per cell, merged into a CSV. The images are decoded and the float logits computed once per
model (cached on disk), so each cell costs one quantization and one quantized pass."""
from __future__ import annotations

import csv
import hashlib
import multiprocessing
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from spiq.config import QuantConfig
from spiq.core.devices import BATCH_SIZE
from spiq.models.data import ImageError, Preprocess
from spiq.models.folders import find_images
from spiq.models.registry import LoadedModel, get_spec, load_model
from spiq.analysis.evaluate import evaluate, load_calibration, load_images, logits

# What a cell file holds: `spiq evaluate --json`'s fields, the logit SQNR, and the digest of the
# inputs it was computed on (so that a resumed sweep redoes a cell computed on other images).
CELL_FIELDS = ("model", "method", "wbits", "abits", "n_images", "top1", "top1_fp", "agreement", "seconds",
               "n_skipped", "logit_sqnr_db", "inputs")
CSV_FIELDS = (*CELL_FIELDS, "pareto")


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    wbits: int
    abits: int

    @property
    def name(self) -> str:
        return f"{self.model}__{self.method}__W{self.wbits}A{self.abits}"


def plan_cells(models, methods, wbits, abits) -> list[Cell]:
    """Every cell of the grid, models outermost, in the order given (a value given twice, once)."""
    return list(dict.fromkeys(Cell(m, meth, w, a) for m in models for meth in methods for w in wbits for a in abits))


def cell_config(base: QuantConfig, cell: Cell) -> QuantConfig:
    return base.replace(method=cell.method, weight_bits=cell.wbits, input_bits=cell.abits)


@dataclass(frozen=True)
class Scale:
    """Where the forward passes run and how many images at a time; `workers` decode the folder."""
    device: str = "cpu"
    batch_size: int = BATCH_SIZE
    workers: int = 0


@dataclass
class SweepInputs:
    """What every cell of one model reads: the evaluation images, their float logits, and the
    calibration images (None when no method of the sweep calibrates)."""
    images: torch.Tensor
    labels: torch.Tensor
    fp_logits: torch.Tensor
    skipped: list[str]
    calib: torch.Tensor | None = None
    calib_skipped: tuple[str, ...] = ()


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_digest(root, preprocess: Preprocess, limit: int | None = None) -> str:
    """The files a folder gives (names and sizes, not absolute paths, so that two machines agree on
    the same copy) and how they are preprocessed."""
    items = find_images(root)[:limit]
    root = Path(root)
    files = [(str(p.relative_to(root)), p.stat().st_size if p.exists() else -1) for p, _ in items]
    return digest(files, asdict(preprocess))


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp) beside `path`, then move it there: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(tmp, 0o666 & ~mask)   # mkstemp's 0600 would keep the results from the others who read them
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, keys) -> dict | None:
    try:
        data = torch.load(path, weights_only=True)
    except Exception:   # missing, cut short, or not ours: computed again
        return None
    return data if isinstance(data, dict) and set(keys) <= set(data) else None


def _refuse_skipped(skipped, on_skip) -> None:
    """A cache made while skipping bad images, read under --strict: refuse as the loader would have."""
    if skipped and on_skip is None:
        raise ImageError(f"{skipped[0]}: could not be read")


def _recording(on_skip):
    """`on_skip` that also lists the skipped paths (kept with the cache), or None under --strict."""
    skipped: list[str] = []
    if on_skip is None:
        return skipped, None

    def skip(path, exc):
        skipped.append(str(path))
        on_skip(path, exc)
    return skipped, skip


def eval_inputs(loaded: LoadedModel, root, limit: int | None, cache: Path, progress=None, on_skip=None,
                scale: Scale | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Images, labels, float logits and skipped paths of a folder, from `cache` when it has them."""
    data = _load_cached(cache, ("images", "labels", "logits", "skipped"))
    if data is None:
        scale = scale or Scale()
        skipped, skip = _recording(on_skip)
        images, labels, _ = load_images(root, loaded.preprocess, limit, progress=progress, on_skip=skip,
                                        workers=scale.workers, batch_size=scale.batch_size)
        fp_logits = logits(loaded.model, images, scale.batch_size, device=scale.device)
        data = {"images": images, "labels": labels, "logits": fp_logits, "skipped": skipped}
        atomic_save(cache, lambda tmp: torch.save(data, tmp))
    _refuse_skipped(data["skipped"], on_skip)
    return data["images"], data["labels"], data["logits"], list(data["skipped"])


def calib_inputs(loaded: LoadedModel, root, n: int, cache: Path, progress=None,
                 on_skip=None) -> tuple[torch.Tensor, list[str]]:
    """`load_calibration` of a folder (what `spiq evaluate` calibrates on), from `cache` when it has it."""
    data = _load_cached(cache, ("calib", "skipped"))
    if data is None:
        skipped, skip = _recording(on_skip)
        calib = load_calibration(root, loaded.preprocess, n, progress=progress, on_skip=skip)
        data = {"calib": calib, "skipped": skipped}
        atomic_save(cache, lambda tmp: torch.save(data, tmp))
    _refuse_skipped(data["skipped"], on_skip)
    return data["calib"], list(data["skipped"])


def run_cell(cell: Cell, base: QuantConfig, loaded: LoadedModel, inputs: SweepInputs, key: str,
             scale: Scale | None = None) -> dict:
    """One cell's record: what `spiq evaluate --json` writes for it, plus the logit SQNR."""
    config = cell_config(base, cell)
    calib = inputs.calib if config.needs_calibration else None
    scale = scale or Scale()
    result = evaluate(cell.model, inputs.images, inputs.labels, config, calib=calib, float_model=loaded,
                      fp_logits=inputs.fp_logits, device=scale.device, batch_size=scale.batch_size)
    # counted as `spiq evaluate` counts them: the calibration images' only when it calibrates
    skipped = set(inputs.skipped) | (set(inputs.calib_skipped) if calib is not None else set())
    return {**result.to_dict(), "n_skipped": len(skipped), "inputs": key}


def cell_path(cells_dir: Path, cell: Cell) -> Path:
    return Path(cells_dir) / f"{cell.name}.json"


def write_cell(cells_dir: Path, cell: Cell, record: dict) -> Path:
    path = cell_path(cells_dir, cell)
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return path


def read_cell(path: Path) -> dict | None:
    """A cell file's record, or None when it is cut short, corrupt or not a cell."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not set(CELL_FIELDS) <= set(record):
        return None
    try:
        named = Cell(record["model"], record["method"], int(record["wbits"]), int(record["abits"])).name
    except (TypeError, ValueError):
        return None
    return record if named == Path(path).stem else None   # a file renamed by hand is not that cell


def pending(cells: list[Cell], cells_dir: Path, keys: dict[str, str]) -> list[Cell]:
    """The cells with no valid file computed on the same inputs (keys: cell name -> inputs digest)."""
    todo = []
    for cell in cells:
        record = read_cell(cell_path(cells_dir, cell))
        if record is None or record["inputs"] != keys[cell.name]:
            todo.append(cell)
    return todo


def merge(cells_dir: Path) -> list[dict]:
    """Every valid cell in the folder, wherever it was computed, sorted by model, method and bits."""
    records = [r for p in sorted(Path(cells_dir).glob("*.json")) if (r := read_cell(p)) is not None]
    return sorted(records, key=lambda r: (r["model"], r["method"], -r["wbits"], -r["abits"]))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, score) no other point beats: none has a cost as low and a score
    as high with one of the two strictly better. Ordered by cost."""
    front = []
    for i, (c, s) in enumerate(points):
        if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in points):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def mark_pareto(records: list[dict]) -> list[dict]:
    """Each record with `pareto`: on its model's front of mean input bits against agreement
    (uniform widths: the mean input bits are the input bits)."""
    out = [{**r, "pareto": False} for r in records]
    for model in {r["model"] for r in out}:
        idx = [i for i, r in enumerate(out) if r["model"] == model]
        for j in pareto_front([(out[i]["abits"], out[i]["agreement"]) for i in idx]):
            out[idx[j]]["pareto"] = True
    return out


def write_csv(records: list[dict], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(records)
    atomic_save(Path(path), write)


@dataclass
class Sweep:
    """Where a sweep reads and writes, and the recipe each cell changes (method and bits only)."""
    images: str
    out: Path
    base: QuantConfig
    limit: int | None = None
    calib: str | None = None   # None: drawn from `images`, as `spiq evaluate` does
    strict: bool = False
    scale: Scale = Scale()

    @property
    def cells_dir(self) -> Path:
        return Path(self.out) / "cells"

    @property
    def cache_dir(self) -> Path:
        return Path(self.out) / "cache"

    def calib_source(self) -> str:
        return self.calib or self.images


@dataclass
class ModelJob:
    """One model's share of a sweep, as a worker process gets it: the cache files, not the tensors."""
    model: str
    eval_cache: Path
    calib_cache: Path | None
    calib_n: int


def cell_keys(sweep: Sweep, cells: list[Cell]) -> dict[str, str]:
    """The inputs digest of each cell: the images, the cell's whole config and, for a method that
    calibrates, the calibration images. A cell file with another digest is computed again."""
    keys, folders = {}, {}
    for cell in cells:
        pre = get_spec(cell.model).preprocess
        config = cell_config(sweep.base, cell)
        if cell.model not in folders:
            folders[cell.model] = folder_digest(sweep.images, pre, sweep.limit)
        calib = None
        if config.needs_calibration:
            calib = (folder_digest(sweep.calib_source(), pre), config.calib_images)
        keys[cell.name] = digest(folders[cell.model], config.to_dict(), calib)
    return keys


def model_job(sweep: Sweep, model: str, cells: list[Cell]) -> ModelJob:
    pre = get_spec(model).preprocess
    configs = [cell_config(sweep.base, c) for c in cells if c.model == model]
    calib_n = max((c.calib_images for c in configs if c.needs_calibration), default=0)
    eval_cache = sweep.cache_dir / f"{model}_{folder_digest(sweep.images, pre, sweep.limit)}.pt"
    calib_cache = None
    if calib_n:
        calib_cache = sweep.cache_dir / f"{model}_calib{calib_n}_{folder_digest(sweep.calib_source(), pre)}.pt"
    return ModelJob(model, eval_cache, calib_cache, calib_n)


# One model's float model and inputs, per process: a worker keeps them from one cell to the next.
_HELD: dict[str, tuple[LoadedModel, SweepInputs]] = {}


def hold(job: ModelJob, sweep: Sweep, loading=None, calibrating=None, on_skip=None) -> None:
    """Load `job`'s model and inputs (decoding the images once, into the cache) for the cells to read."""
    if job.model in _HELD:
        return
    _HELD.clear()   # one model at a time: 500 images at 224 px are 300 MB
    loaded = load_model(job.model)
    on_skip = None if sweep.strict else (on_skip or (lambda path, exc: None))
    images, labels, fp_logits, skipped = eval_inputs(loaded, sweep.images, sweep.limit, job.eval_cache,
                                                     progress=loading, on_skip=on_skip, scale=sweep.scale)
    inputs = SweepInputs(images, labels, fp_logits, skipped)
    if job.calib_cache is not None:
        calib, calib_skipped = calib_inputs(loaded, sweep.calib_source(), job.calib_n, job.calib_cache,
                                            progress=calibrating, on_skip=on_skip)
        inputs.calib, inputs.calib_skipped = calib, tuple(calib_skipped)
    _HELD[job.model] = (loaded, inputs)


def cell_job(cell: Cell, sweep: Sweep, job: ModelJob, key: str) -> Cell:
    """Compute one cell and write its file: in this process or in a worker (spawned: picklable args)."""
    hold(job, sweep)
    loaded, inputs = _HELD[job.model]
    write_cell(sweep.cells_dir, cell, run_cell(cell, sweep.base, loaded, inputs, key, sweep.scale))
    return cell


def run_sweep(sweep: Sweep, cells: list[Cell], jobs: int = 1, done: Callable[[Cell], None] | None = None,
              loading=None, calibrating=None, on_skip=None, start: Callable[[int], None] | None = None) -> list[Cell]:
    """Compute the cells that have no valid file yet, each written the moment it is done; returns them.

    `jobs` > 1 runs the cells in that many spawned processes, which read the cached inputs this
    process writes first. loading/calibrating(model) give the image loaders' progress callbacks.
    """
    keys = cell_keys(sweep, cells)
    todo = pending(cells, sweep.cells_dir, keys)
    model_jobs = {m: model_job(sweep, m, cells) for m in dict.fromkeys(c.model for c in todo)}
    done = done or (lambda cell: None)
    if start is not None:
        start(len(todo))

    def prepare(model):
        hold(model_jobs[model], sweep, loading and loading(model), calibrating and calibrating(model), on_skip)
    try:
        if jobs == 1:
            for cell in todo:
                prepare(cell.model)
                done(cell_job(cell, sweep, model_jobs[cell.model], keys[cell.name]))
            return todo
        for model in model_jobs:   # the caches, once, before any worker reads them
            prepare(model)
        _HELD.clear()
        # Workers keep torch's default thread count, as `spiq evaluate` does: a quantized model's
        # logits depend on it (0.2-0.3 dB of logit SQNR on 6 images between 1 and 2 threads), and a
        # cell must not depend on --jobs.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(cell_job, c, sweep, model_jobs[c.model], keys[c.name]) for c in todo]
            try:
                for future in as_completed(futures):
                    done(future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)   # the cells written so far stay
                raise
        return todo
    finally:
        _HELD.clear()
