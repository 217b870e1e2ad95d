"""Evaluation: top-1 of a float and a quantized model over labelled images, and their agreement."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spiq.config import QuantConfig
from spiq.core.devices import BATCH_SIZE, on_device, resolve_device
from spiq.core.metrics import mean_logit_sqnr_db
from spiq.models.data import DatasetError, ImageError, Preprocess
from spiq.models.folders import find_images, image_batches, load_image
from spiq.models.registry import LoadedModel, load_model
from spiq.quantize.api import quantize
from spiq.quantize.report import QuantResult, module_of


@dataclass
class EvalResult:
    model: str
    method: str
    wbits: int | None
    abits: int | None
    n_images: int
    top1: float
    top1_fp: float
    agreement: float
    seconds: float
    logit_sqnr_db: float | None = None   # when evaluate() was given the float logits
    predictions: torch.Tensor | None = field(default=None, repr=False)   # top-1 per image, not in the JSON

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["predictions"]
        if d["logit_sqnr_db"] is None:  # the CLI's JSON keeps its exact keys
            del d["logit_sqnr_db"]
        return d

    def summary(self) -> str:
        bits = "float" if self.method == "fp" else f"W{self.wbits}A{self.abits}"
        return (f"{self.model} {self.method} {bits}: top-1 {self.top1 * 100:.1f}% (float {self.top1_fp * 100:.1f}%), "
                f"agreement {self.agreement * 100:.1f}% on {self.n_images} images in {self.seconds:.1f}s")


@torch.no_grad()
def _batched(model: nn.Module | QuantResult, images: torch.Tensor, batch: int, progress: Callable[[int], None] | None,
             keep: Callable[[torch.Tensor], torch.Tensor], device) -> list[torch.Tensor]:
    device = resolve_device(device)
    net = module_of(model)
    if isinstance(net, nn.Module):   # any other callable runs where it is
        net = on_device(net, device)
    out = []
    for i in range(0, len(images), batch):
        out.append(keep(net(images[i:i + batch].to(device))).cpu())
        if progress is not None:
            progress(min(batch, len(images) - i))
    return out


def predict(model: nn.Module | QuantResult, images: torch.Tensor, batch: int = BATCH_SIZE,
            progress: Callable[[int], None] | None = None, device="cpu") -> torch.Tensor:
    """Top-1 class of each preprocessed image (N, 3, H, W), computed on `device` (see resolve_device)."""
    out = _batched(model, images, batch, progress, lambda y: y.argmax(1), device)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def logits(model: nn.Module | QuantResult, images: torch.Tensor, batch: int = BATCH_SIZE,
           progress: Callable[[int], None] | None = None, device="cpu") -> torch.Tensor:
    """The logits (N, classes), in the same batches as `predict`, so their argmax is its answer."""
    return torch.cat(_batched(model, images, batch, progress, lambda y: y, device))


def load_images(root: str | Path, preprocess: Preprocess, limit: int | None = None,
                progress: Callable[[int], None] | None = None,
                on_skip: Callable[[Path, ImageError], None] | None = None,
                workers: int = 0, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Preprocessed images, labels and paths of a labelled folder (first `limit` in find_images order),
    decoded by `workers` DataLoader processes.

    An image that does not decode raises ImageError naming it; given `on_skip`, it is left out
    (absent from the paths returned) and passed to on_skip(path, error) instead.
    """
    items = find_images(root)[:limit]
    xs, kept = [], []
    for batch in image_batches(items, preprocess, batch_size, workers, on_skip):
        if len(batch.indices):
            xs.append(batch.images)
            kept += batch.indices.tolist()
        if progress is not None:
            progress(len(batch.indices))
    if not kept:
        raise DatasetError(f"{root}: none of its images could be read ({len(items)} skipped)")
    return torch.cat(xs), torch.tensor([items[i][1] for i in kept]), [items[i][0] for i in kept]


def _decode(paths: list[Path], preprocess: Preprocess, progress: Callable[[int], None] | None,
            on_skip: Callable[[Path, ImageError], None] | None = None,
            want: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """The first `want` (default: all) of `paths` that decode, preprocessed, and their indices."""
    xs, kept = [], []
    for i, path in enumerate(paths):
        if want is not None and len(kept) == want:
            break
        try:
            xs.append(load_image(path, preprocess))
        except ImageError as exc:
            if on_skip is None:
                raise
            on_skip(path, exc)
            continue
        kept.append(i)
        if progress is not None:
            progress(1)
    return (torch.stack(xs) if xs else torch.zeros(0)), kept


def calibration_split(count: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of n of `count` images picked at random (seeded) for calibration, and of the others."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:n], order[n:].sort().values


def calibration_subset(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n images picked at random (seeded) from a batch: the calib-* methods' data."""
    return images[calibration_split(len(images), n, seed)[0]]


def paired_difference(agree_a: torch.Tensor, agree_b: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Difference of two methods' agreement on the same images, and its half-width at ~95 %.

    Only the images on which the two differ carry information (McNemar), so this is the honest
    scale for "within 0.5 points": with n = 500 one image is 0.2 points.
    """
    a, b = agree_a.bool(), agree_b.bool()
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    diff = (only_a - only_b) / n
    var = max((only_a + only_b) / n ** 2 - diff ** 2 / n, 0.0)
    return diff, z * math.sqrt(var)


def load_calibration(root: str | Path, preprocess: Preprocess, n: int, seed: int = 0,
                     progress: Callable[[int], None] | None = None,
                     on_skip: Callable[[Path, ImageError], None] | None = None) -> torch.Tensor:
    """`calibration_subset` of a folder's images, decoding only the n it picks.

    With `on_skip` (see load_images) an image that does not decode is replaced by the next in the
    same random order, so a folder with good images only gets the same n as before.
    """
    items = find_images(root)
    g = torch.Generator().manual_seed(seed)
    order = [items[i][0] for i in torch.randperm(len(items), generator=g).tolist()]
    images, kept = _decode(order, preprocess, progress, on_skip, want=n)
    if not kept:
        raise DatasetError(f"{root}: none of its images could be read for calibration ({len(items)} skipped)")
    return images


def evaluate(model_name: str, images: torch.Tensor, labels: torch.Tensor, config: QuantConfig | None,
             calib: torch.Tensor | None = None, float_model: LoadedModel | None = None,
             fp_pred: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
             quantize_progress: Callable[[float, str], None] | None = None,
             fp_logits: torch.Tensor | None = None, device="cpu", batch_size: int = BATCH_SIZE,
             quantized: QuantResult | None = None) -> EvalResult:
    """Quantize `model_name` with `config` (None: float only) and score it against the float model.

    `float_model` is load_model(model_name), if the caller has it already. Given the float model's
    `logits` on `images`, the result also carries the mean logit SQNR. The quantization runs on the
    CPU; the forward passes on `device` (cpu, cuda, auto), `batch_size` images at a time.
    `quantized`: the model quantize() made for `config` already (a report shows its views of the
    very model it scored).
    """
    device = resolve_device(device)
    start = time.perf_counter()
    if fp_logits is not None:
        fp_pred = fp_logits.argmax(1)
    if float_model is None:
        float_model = load_model(model_name)
    if fp_pred is None:
        fp_pred = predict(float_model.model, images, batch_size, progress, device)
    sqnr = None
    if config is None:
        pred = fp_pred
    else:
        qmodel = quantized if quantized is not None else quantize(float_model, config, calib_data=calib,
                                                                  progress=quantize_progress)
        if fp_logits is not None:
            q_logits = logits(qmodel, images, batch_size, progress, device)
            pred, sqnr = q_logits.argmax(1), mean_logit_sqnr_db(fp_logits, q_logits)
        else:
            pred = predict(qmodel, images, batch_size, progress, device)
    return _result(model_name, config, labels, fp_pred, pred, time.perf_counter() - start, sqnr)


def evaluate_folder(model_name: str, root: str | Path, config: QuantConfig | None, calib: torch.Tensor | None = None,
                    float_model: LoadedModel | None = None, limit: int | None = None, device="cpu",
                    batch_size: int = BATCH_SIZE, workers: int = 0,
                    on_skip: Callable[[Path, ImageError], None] | None = None,
                    progress: Callable[[int], None] | None = None,
                    quantize_progress: Callable[[float, str], None] | None = None,
                    quantized: QuantResult | None = None) -> EvalResult:
    """`evaluate` on the first `limit` images of a folder (find_images' layouts), streamed.

    `workers` DataLoader processes decode while the models run; each batch goes through the float
    and the quantized model on `device` and is dropped, so a 50,000-image folder is never held in
    memory. Same batches, same predictions as evaluate() on load_images(). Skipped images as there.
    `quantized`: quantize(float_model, config) made already (one recipe on several folders, or
    timing the evaluation alone).
    """
    device = resolve_device(device)   # a missing GPU is refused before any work
    items = find_images(root)[:limit]
    start = time.perf_counter()
    if float_model is None:
        float_model = load_model(model_name)
    fp_net = on_device(float_model.model, device)
    q_net = None
    if config is not None:
        quantized = quantized or quantize(float_model, config, calib_data=calib, progress=quantize_progress)
        q_net = on_device(quantized.model, device)
    labels, fp_pred, pred = [], [], []
    with torch.no_grad():
        for batch in image_batches(items, float_model.preprocess, batch_size, workers, on_skip,
                                   pin_memory=device.type == "cuda"):
            if not len(batch.labels):
                continue
            x = batch.images.to(device, non_blocking=True)
            labels.append(batch.labels)
            fp_pred.append(fp_net(x).argmax(1).cpu())
            pred.append(fp_pred[-1] if q_net is None else q_net(x).argmax(1).cpu())
            if progress is not None:
                progress(len(batch.labels) * (1 if q_net is None else 2))
    if not labels:
        raise DatasetError(f"{root}: none of its images could be read ({len(items)} skipped)")
    return _result(model_name, config, torch.cat(labels), torch.cat(fp_pred), torch.cat(pred),
                   time.perf_counter() - start)


def _result(model_name: str, config: QuantConfig | None, labels: torch.Tensor, fp_pred: torch.Tensor,
            pred: torch.Tensor, seconds: float, sqnr: float | None = None) -> EvalResult:
    n = len(labels)
    return EvalResult(
        model=model_name,
        method="fp" if config is None else config.method,
        wbits=None if config is None else config.weight_bits,
        abits=None if config is None else config.input_bits,
        n_images=n,
        top1=(pred == labels).float().mean().item() if n else 0.0,
        top1_fp=(fp_pred == labels).float().mean().item() if n else 0.0,
        agreement=(pred == fp_pred).float().mean().item() if n else 0.0,
        seconds=seconds,
        logit_sqnr_db=sqnr,
        predictions=pred,
    )
