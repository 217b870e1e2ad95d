"""What the benchmarks share: where the sample is, and how results are written."""
from __future__ import annotations

import json
import os
import platform
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


def save(name: str, data: dict, markdown: str | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    if markdown is not None:
        (RESULTS / f"{name}.md").write_text(markdown)
