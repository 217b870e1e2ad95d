"""Where a quantized model loses, layer by layer: input clipping, input rounding, or the weights.

    python -m bench.layer_loss [--method spiq] [--wbits 8] [--abits 4] [--images 32]

For each layer, the output SQNR (dB) on real images with one error source at a time (the layer
isolated, float inputs). For SPIQ the weight column includes the cost of folding the per-channel
input scales into the weights. Writes bench/results/layer_loss_<method>_W<w>A<a>.json.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from bench.common import SAMPLE_DIR, save

import spiq
from spiq.analysis.layers import layer_breakdown
from spiq.analysis.evaluate import calibration_subset, load_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="spiq")
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--granularity", choices=["channel", "tensor"])
    p.add_argument("--images", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, preprocess, _ = spiq.load_model("efficientnet_lite0")
    pool, _, _ = load_images(SAMPLE_DIR, preprocess)
    images = calibration_subset(pool, args.images, seed=1)
    calib = calibration_subset(pool, 32, seed=0)
    cfg = spiq.QuantConfig(method=args.method, weight_bits=args.wbits, input_bits=args.abits,
                           input_granularity=args.granularity)
    q = spiq.quantize(model, cfg, calib_data=calib, preprocess=preprocess)
    rows = layer_breakdown(model, q, images)
    print(f"{args.method} W{args.wbits}A{args.abits}: output SQNR (dB) per layer, {len(images)} images")
    print(f"{'layer':24} {'clip':>6} {'input':>6} {'weight':>6} {'both':>6} {'clipped %':>9}  dominant")
    for r in rows:
        dominant = "weights" if r.weight < r.input else ("clipping" if r.clip < r.input + 3 else "rounding")
        print(f"{r.name:24} {r.clip:6.1f} {r.input:6.1f} {r.weight:6.1f} {r.both:6.1f} {r.clipped * 100:9.3f}  {dominant}")
    tag = f"{args.method}{'_' + args.granularity if args.granularity else ''}_W{args.wbits}A{args.abits}"
    save(f"layer_loss_{tag}", {"config": cfg.to_dict(), "n_images": len(images),
                               "layers": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
