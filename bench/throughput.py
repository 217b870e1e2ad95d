"""Images per second of `spiq evaluate` (decoding, the float model and, for SPIQ, the quantized one
on each batch) with 0 and 2 DataLoader workers, and the time a 50,000-image evaluation would take.

    python -m bench.throughput [--limit N] [--batch-size B] [--device auto|cpu|cuda] [--workers 0,2]

Runs on a GPU when one is present (--device auto). The quantization itself (once per recipe, on
the CPU) is timed apart, not counted in the images per second. The machine's load average is
recorded: on a shared machine other jobs slow every figure. Writes bench/results/throughput.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.analysis.evaluate import evaluate_folder
from spiq.core.devices import resolve_device

MODEL = "efficientnet_lite0"
VARIANTS = {"float": None, "SPIQ W8A8": spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8),
            "SPIQ W8A4": spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4)}
FULL_VAL = 50_000


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def measure(loaded, args, device) -> list[dict]:
    rows = []
    for label, config in VARIANTS.items():
        start = time.perf_counter()
        quantized = None if config is None else spiq.quantize(loaded, config)
        quantize_s = time.perf_counter() - start
        for workers in args.workers:
            load = os.getloadavg()
            r = evaluate_folder(MODEL, SAMPLE_DIR, config, float_model=loaded, limit=args.limit, device=device,
                                batch_size=args.batch_size, workers=workers, quantized=quantized)
            ips = r.n_images / r.seconds
            rows.append({"variant": label, "workers": workers, "n_images": r.n_images, "seconds": r.seconds,
                         "images_per_s": ips, "quantize_s": quantize_s, "full_val_s": quantize_s + FULL_VAL / ips,
                         "agreement": r.agreement, "loadavg_1min": [load[0], os.getloadavg()[0]]})
            print(f"{label:10} workers {workers}: {ips:6.1f} img/s, 50,000 images in "
                  f"{hours(rows[-1]['full_val_s'])} (load {load[0]:.1f})", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=lambda t: [int(w) for w in t.split(",")], default=[0, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    device = resolve_device(args.device, "--device")
    loaded = spiq.load_model(MODEL)
    load_before = os.getloadavg()
    rows = measure(loaded, args, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"{MODEL} on {gpu or 'the CPU'}, {rows[0]['n_images']} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load_before[0]:.1f}")
    print(f"{'variant':10} {'workers':>7} {'img/s':>7} {'50,000 images':>14}")
    for r in rows:
        print(f"{r['variant']:10} {r['workers']:7} {r['images_per_s']:7.1f} {hours(r['full_val_s']):>14}")
    save("throughput", {"model": MODEL, "n_images": rows[0]["n_images"], "batch_size": args.batch_size,
                        "device": str(device), "gpu": gpu, "cores": os.cpu_count(), "full_val": FULL_VAL,
                        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                        "machine": machine(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
