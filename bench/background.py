"""How much the app's background distillation slows a visitor's requests (target: at most 20 %).

    python -m bench.background [--repeats R]

The app distils the other models' bias-fit images after start, one `spiq distill` child at a time
at nice 19 and SCHED_IDLE on one thread (`spiq.ui.background`). Here a child of that same class distils 16
EfficientNet-Lite0 images into a scratch cache (a real distillation: only 8 ship), while the
visitor's two kinds of request are timed in this process with the app's model cache, 2 threads:
- predict: top-5 of the float and the quantized model for a new image, the recipe cached;
- apply: a recipe not seen before quantized (SPIQ, new bits), then its predictions.
The child is started once and then, request by request, stopped (SIGSTOP: quiet) and let run
(SIGCONT: distilling), so both kinds of timing see the same machine and the same mix of recipes;
the slowdown is the median while it runs over the median while it is stopped. Writes
bench/results/background.json.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bench.common import ROOT, machine, save

from spiq.config import QuantConfig
from spiq.ui import views
from spiq.ui.background import RUNNING, BackgroundDistiller
from spiq.ui.cache import ModelCache

MODEL = "efficientnet_lite0"
TARGET = 0.20
IMAGES = ["palace.jpg", "coffee.jpg", "cat.jpg", "camera.jpg", "rocket.jpg"]


def child(_name: str) -> list[str]:
    return [sys.executable, "-m", "spiq", "distill", "--model", MODEL, "--images", "16"]


def children() -> list[int]:
    """The pids of this process's children (from /proc: no psutil here)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def timed(cache: ModelCache, image: Image.Image, recipe: QuantConfig) -> dict:
    """Seconds of each request kind, once."""
    start = time.perf_counter()
    views.predictions(cache, views.scene(cache, MODEL, QuantConfig(), image))
    predict = time.perf_counter() - start
    start = time.perf_counter()
    views.predictions(cache, views.scene(cache, MODEL, recipe, image))
    return {"predict": predict, "apply": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="requests of each kind in each state (at most 23)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    os.environ["SPIQ_CACHE"] = tempfile.mkdtemp(prefix="spiq-bench-cache-")   # the child distils for real
    cache = ModelCache(max_quantized=64, calib_dir=ROOT / "assets")
    # every apply a new recipe (48 of them): bits no run repeats
    recipes = iter(QuantConfig(method="spiq", weight_bits=w, input_bits=a)
                   for w in range(8, 1, -1) for a in range(8, 1, -1) if (w, a) != (8, 8))
    cache.quantized(MODEL, QuantConfig())
    cache.warm(MODEL)
    images = [Image.open(ROOT / "assets" / name).convert("RGB") for name in IMAGES]
    bg = BackgroundDistiller(child)
    bg.start([MODEL])
    time.sleep(5)   # the child past its imports, distilling
    (pid,) = children()
    timed(cache, images[0], next(recipes))   # the first requests of a process are slower: not counted
    runs = {"quiet": [], "during": []}
    for i in range(args.repeats):
        for state, sig in (("quiet", signal.SIGSTOP), ("during", signal.SIGCONT)):
            os.kill(pid, sig)
            time.sleep(0.2)
            runs[state].append(timed(cache, images[i % len(images)], next(recipes)))
    still_running = bg.state(MODEL).state == RUNNING
    os.kill(pid, signal.SIGCONT)
    bg.stop()
    med = {state: {k: statistics.median(r[k] for r in rs) for k in ("predict", "apply")} for state, rs in runs.items()}
    rows = {k: {"quiet_s": med["quiet"][k], "with_background_s": med["during"][k],
                "slowdown": med["during"][k] / med["quiet"][k] - 1} for k in ("predict", "apply")}
    data = {"model": MODEL, "repeats": args.repeats, "target_slowdown": TARGET, "rows": rows, "runs": runs,
            "child_ran_throughout": still_running, "load_average": os.getloadavg(), "machine": machine()}
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
