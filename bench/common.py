"""What the benchmarks share: where the sample is, and how results are written."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from spiq.core.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLE_DIR = Path(os.environ.get("SPIQ_SAMPLE_DIR", ROOT.parent / "shared" / "data" / "imagenet-sample"))

keep_freed_memory()   # every benchmark imports this first


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def commit() -> str:
    """The checkout the numbers come from: its short commit, with "-dirty" where tracked files differ
    from it (the results then belong to the commit that records them with those changes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if changed else "")


def save(name: str, data: dict, markdown: str | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"commit": commit(), **data}   # the docs say which commit each number was measured at
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    if markdown is not None:
        (RESULTS / f"{name}.md").write_text(markdown)
