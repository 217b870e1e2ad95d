"""The quantized numbers are pinned: a change that moves any recipe's logits fails here until
tests/quantize/fingerprint.json is rewritten with it (see fingerprint.py)."""
from pathlib import Path

import numpy as np
import torch

from conftest import load_script

SCRIPT = Path(__file__).with_name("fingerprint.py")


fingerprint = load_script(SCRIPT)   # as `python tests/quantize/fingerprint.py` runs it


def test_the_stored_fingerprint_covers_every_cnn_method_at_each_width(lite0):
    stored = fingerprint.load()
    assert sorted(stored["recipes"]) == sorted(fingerprint.recipes(lite0))
    assert len(stored["recipes"]) == 4 * len({r.split()[0] for r in stored["recipes"]}) >= 4 * 7
    assert stored["images"] == [p.name for p in fingerprint.example_images()]
    assert stored["calibration"] == [p.name for p in fingerprint.calibration_images()]
    assert (stored["grid"], stored["threads"]) == (fingerprint.GRID, fingerprint.THREADS)


def test_quantized_logits_match_the_stored_fingerprint():
    stored = fingerprint.load()
    moved = fingerprint.moved(stored, fingerprint.quantized_logits())
    other_torch = f" (stored with torch {stored['torch']}, this is {torch.__version__})" * (stored["torch"] != torch.__version__)
    assert not moved, (
        f"{len(moved)} recipe(s) moved from tests/quantize/fingerprint.json{other_torch}:\n  " + "\n  ".join(moved) + "\n"
        "If the change is meant to move them: python tests/quantize/fingerprint.py --update, re-run "
        "python -m bench.accuracy and python -m bench.results_doc, and commit them with the change, saying why "
        "in the message. If not, the change moved the quantized models by mistake.")


def test_the_hash_ignores_noise_at_rounding_boundaries_and_catches_one_grid_step():
    grid, near = fingerprint.GRID, fingerprint.NEAR
    logits = np.random.default_rng(0).normal(0, 5, (6, 1000))
    logits[0, 0] = 1234.5 * grid   # on a rounding boundary
    stored = fingerprint.entry(logits)
    assert 0 in stored["floored"] and len(stored["floored"]) < 0.05 * logits.size

    noise = np.random.default_rng(1).uniform(-0.9 * near * grid, 0.9 * near * grid, logits.shape)
    for noisy in (logits + noise, logits - noise):
        assert fingerprint.digest(noisy, stored["floored"]) == stored["sha256"]
    stepped = logits.copy()
    stepped[3, 7] += grid
    assert fingerprint.digest(stepped, stored["floored"]) != stored["sha256"]
    assert fingerprint.moved({"recipes": {"r": stored}}, {"r": stepped}) == [
        f"r: mean logit {stored['mean']:.6f} -> {fingerprint.entry(stepped)['mean']:.6f}, "
        f"rms {stored['rms']:.6f} -> {fingerprint.entry(stepped)['rms']:.6f}, top-1 changed on 0 of 6 images"]
