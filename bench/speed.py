"""Time of the SPIQ simulation against the float model over the image sample (2 threads).

    python -m bench.speed [--limit N] [--repeats R]

SPIQ is static: its per-channel input scales are fixed and folded into the weights, so the
simulation costs one fused fake-quant per layer input. Dynamic methods compute ranges per sample.
Writes bench/results/speed.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.analysis.evaluate import load_images

METHODS = ["spiq", "static-tensor", "dynamic-tensor", "dynamic-channel"]


@torch.no_grad()
def timed(model, images, batch, repeats) -> float:
    model(images[:batch])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, preprocess, _ = spiq.load_model("efficientnet_lite0")
    images, _, _ = load_images(SAMPLE_DIR, preprocess, args.limit)
    t_fp = timed(model, images, args.batch, args.repeats)
    rows = [{"method": "fp", "seconds": t_fp, "ratio": 1.0}]
    for m in METHODS:
        q = spiq.quantize(model, spiq.QuantConfig(method=m, weight_bits=8, input_bits=4), preprocess=preprocess)
        t = timed(q, images, args.batch, args.repeats)
        rows.append({"method": m, "seconds": t, "ratio": t / t_fp})
    print(f"EfficientNet-Lite0, {len(images)} images, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'method':16} {'seconds':>8} {'x float':>8}")
    for r in rows:
        print(f"{r['method']:16} {r['seconds']:8.2f} {r['ratio']:8.2f}")
    save("speed", {"n_images": len(images), "batch": args.batch, "machine": machine(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
