"""The quantized numbers' fingerprint: EfficientNet-Lite0's logits on the shipped example photos for
every method that applies to a CNN at W8A8, W8A6, W8A4 and W4A8, rounded to GRID and hashed per
recipe, kept in fingerprint.json beside this file and checked by test_fingerprint.py.

    python tests/quantize/fingerprint.py            # which recipes moved, and by how much
    python tests/quantize/fingerprint.py --update   # rewrite fingerprint.json

A change that moves any recipe's numbers updates fingerprint.json in the same commit, with
bench/accuracy.py re-run and the reason in the commit message.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

import spiq
from spiq.models.data import IMAGE_EXTENSIONS, load_batch
from spiq.quantize.api import methods_for
from spiq.quantize.memo import Memo

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
STORED = Path(__file__).with_name("fingerprint.json")
MODEL = "efficientnet_lite0"
BITS = ["W8A8", "W8A6", "W8A4", "W4A8"]
# The logits are hashed on this grid. At one thread count, runs agree bit for bit on this machine
# (fresh quantizations and ones sharing a memo too), so the grid need only sit above
# float noise; a change that moves any logit by a step moves the hash, and real changes move them
# by far more (a bias-fit shift 0.1 % smaller: every recipe).
GRID = 1e-3
# A logit within NEAR grid steps of a rounding boundary when the fingerprint was written would
# flip on a perturbation of that size: those entries are hashed by floor() instead of round(),
# whose boundaries lie half a step away, so such a perturbation cannot move the hash (a rounded
# hash is otherwise flaky at its boundaries). Their indices are stored with the hash.
NEAR = 0.01
# Quantized logits depend on the thread count: the bias fit's passes over its 8 distilled images
# differ in the last bits between 1 and 2 threads, and rounding makes that up to 2 in a W8A4 logit.
# The fingerprint is taken with the thread count of the tests and benchmarks, whatever the caller set.
THREADS = 2


def example_images() -> list[Path]:
    """The shipped example photos, in the app's order."""
    return [ASSETS / name for name in (ASSETS / "examples.txt").read_text().split()]


def calibration_images() -> list[Path]:
    """What the app's calib-* methods calibrate on: the image files of assets/, sorted (spiq.ui.cache)."""
    return sorted(p for p in ASSETS.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def recipes(model: torch.nn.Module) -> list[str]:
    return [f"{method} {bits}" for method in methods_for(model) for bits in BITS]


def config_of(recipe: str) -> spiq.QuantConfig:
    method, bits = recipe.split()
    w, a = bits.lstrip("W").split("A")
    return spiq.QuantConfig(method=method, weight_bits=int(w), input_bits=int(a))


def quantized_logits(only: list[str] | None = None, shared: bool = True) -> dict[str, np.ndarray]:
    """Each recipe's logits on the example photos, one quantization per recipe (each method's defaults).

    `shared`: the recipes share one memo, as the app's re-quantizations do (the folding,
    laws and ranges made once); the logits are those of a fresh quantize() either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        loaded = spiq.load_model(MODEL)
        x = load_batch(example_images(), loaded.preprocess)
        calib = load_batch(calibration_images(), loaded.preprocess)
        memo = Memo(loaded) if shared else None
        out = {}
        with torch.no_grad():
            for recipe in only or recipes(loaded.model):
                config = config_of(recipe)
                q = spiq.quantize(loaded, config, calib_data=calib if config.needs_calibration else None,
                                  memo=memo)
                out[recipe] = q(x).numpy().astype(np.float64)
        return out
    finally:
        torch.set_num_threads(threads)


def near_boundary(logits: np.ndarray) -> list[int]:
    """Flat indices of the logits within NEAR grid steps of a rounding boundary."""
    frac = np.abs(np.mod(logits.ravel() / GRID, 1.0) - 0.5)
    return np.flatnonzero(frac < NEAR).tolist()


def digest(logits: np.ndarray, near: list[int]) -> str:
    """sha256 of the logits on the grid (int64): rounded, but floored at the `near` indices."""
    steps = logits.ravel() / GRID
    ints = np.rint(steps)
    ints[near] = np.floor(steps[near])
    return hashlib.sha256(ints.astype(np.int64).tobytes()).hexdigest()


def entry(logits: np.ndarray) -> dict:
    """What is stored of one recipe: the hash, the indices it floors, and numbers to say how far it moved."""
    near = near_boundary(logits)
    return {"sha256": digest(logits, near), "floored": near, "top1": logits.argmax(1).tolist(),
            "mean": round(float(logits.mean()), 6), "rms": round(float(np.sqrt((logits ** 2).mean())), 6)}


def fingerprint(logits: dict[str, np.ndarray]) -> dict:
    return {"model": MODEL, "images": [p.name for p in example_images()],
            "calibration": [p.name for p in calibration_images()], "grid": GRID, "threads": THREADS,
            "torch": torch.__version__,
            "recipes": {r: entry(v) for r, v in logits.items()}}


def moved(stored: dict, logits: dict[str, np.ndarray]) -> list[str]:
    """One line per recipe whose hash differs from the stored one (or that is new or gone)."""
    old, lines = stored["recipes"], []
    for recipe in sorted(set(old) | set(logits)):
        if recipe not in logits:
            lines.append(f"{recipe}: stored, no longer computed")
        elif recipe not in old:
            lines.append(f"{recipe}: new, not stored")
        elif digest(logits[recipe], old[recipe]["floored"]) != old[recipe]["sha256"]:
            now, was = entry(logits[recipe]), old[recipe]
            flips = sum(a != b for a, b in zip(now["top1"], was["top1"]))
            lines.append(f"{recipe}: mean logit {was['mean']:.6f} -> {now['mean']:.6f}, rms {was['rms']:.6f} -> "
                         f"{now['rms']:.6f}, top-1 changed on {flips} of {len(now['top1'])} images")
    return lines


def load() -> dict:
    return json.loads(STORED.read_text())


def dumps(data: dict) -> str:
    """The JSON with one line per recipe, so that a diff shows which recipes moved."""
    head = {k: v for k, v in data.items() if k != "recipes"}
    recipes = ",\n".join(f"  {json.dumps(r)}: {json.dumps(e)}" for r, e in data["recipes"].items())
    return json.dumps(head, indent=1)[:-2] + ',\n "recipes": {\n' + recipes + "\n }\n}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help=f"rewrite {STORED.name} from this checkout's numbers")
    args = p.parse_args(argv)
    logits = quantized_logits()
    if args.update:
        STORED.write_text(dumps(fingerprint(logits)))
        print(f"wrote {STORED} ({len(logits)} recipes)")
        return 0
    lines = moved(load(), logits)
    print("\n".join(lines) if lines else f"all {len(logits)} recipes match {STORED.name}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
