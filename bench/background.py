"""How much the app's background distillation slows a visitor's requests (target: at most 20 %).

    python bench/background.py [--repeats R]

The app distils the other models' bias-fit images after start, one `spiq distill` child at a time
at nice 19 on one thread (`spiq.ui.background`). Here a child of that same class distils 16
EfficientNet-Lite0 images into a scratch cache (a real distillation: only 8 ship), while the
visitor's two kinds of request are timed in this process with the app's model cache, 2 threads:
- predict: top-5 of the float and the quantized model for a new image, the recipe cached;
- apply: a recipe not seen before quantized (SPIQ, new bits), then its predictions.
Each is timed before the child starts, while it runs, and after it is stopped; the slowdown is the
median while running over the median of the two quiet runs. Writes bench/results/background.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

from common import ROOT, machine, save

from spiq.config import QuantConfig
from spiq.ui import views
from spiq.ui.background import RUNNING, BackgroundDistiller
from spiq.ui.cache import ModelCache

MODEL = "efficientnet_lite0"
TARGET = 0.20
IMAGES = ["palace.jpg", "coffee.jpg", "cat.jpg", "camera.jpg", "rocket.jpg"]


def child(_name: str) -> list[str]:
    return [sys.executable, "-m", "spiq", "distill", "--model", MODEL, "--images", "16"]


def timed(cache: ModelCache, repeats: int, recipes: iter) -> dict:
    """Median seconds of each request kind over `repeats`."""
    out = {"predict": [], "apply": []}
    for i in range(repeats):
        image = Image.open(ROOT / "assets" / IMAGES[i % len(IMAGES)]).convert("RGB")
        start = time.perf_counter()
        views.predictions(cache, views.scene(cache, MODEL, QuantConfig(), image))
        out["predict"].append(time.perf_counter() - start)
        start = time.perf_counter()
        views.predictions(cache, views.scene(cache, MODEL, next(recipes), image))
        out["apply"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    os.environ["SPIQ_CACHE"] = tempfile.mkdtemp(prefix="spiq-bench-cache-")   # the child distils for real
    cache = ModelCache(max_quantized=64, calib_dir=ROOT / "assets")
    # every apply a new recipe: bits and granularity combinations no run repeats
    recipes = iter(QuantConfig(method="spiq", weight_bits=w, input_bits=a)
                   for w in range(8, 3, -1) for a in range(8, 3, -1) if (w, a) != (8, 8))
    cache.quantized(MODEL, QuantConfig())
    cache.warm(MODEL)
    before = timed(cache, args.repeats, recipes)
    bg = BackgroundDistiller(child)
    bg.start([MODEL])
    time.sleep(5)   # the child past its imports, distilling
    during = timed(cache, args.repeats, recipes)
    still_running = bg.state(MODEL).state == RUNNING
    bg.stop()
    after = timed(cache, args.repeats, recipes)
    rows = {k: {"quiet_s": (before[k] + after[k]) / 2, "with_background_s": during[k],
                "slowdown": during[k] / ((before[k] + after[k]) / 2) - 1} for k in before}
    data = {"model": MODEL, "repeats": args.repeats, "target_slowdown": TARGET, "rows": rows,
            "before": before, "during": during, "after": after, "child_ran_throughout": still_running,
            "load_average": os.getloadavg(), "machine": machine()}
    lines = ["| request | quiet, s | with background distillation, s | slowdown |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['quiet_s']:.2f} | {r['with_background_s']:.2f} | {r['slowdown'] * 100:+.0f} % |"
              for k, r in rows.items()]
    md = "\n".join(lines) + f"\n\nTarget: at most {TARGET * 100:.0f} %. Load average at the end: " \
         f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n"
    save("background", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
