"""Vision transformers: Liu et al.'s PTQ and SPIQ's LayerNorm ranges against per-tensor and dynamic baselines.

    python -m bench.vit [--models deit_small_patch16_224,deit_base_patch16_224] [--limit N]
    python -m bench.vit --toy [--toy-size tiny|small]   # random weights: mechanics and cost, offline

Reproduces the cells of Liu et al. (NeurIPS 2021) for DeiT-S and DeiT-B (W8A8, W6A6, mixed
precision at 8 and 6 average bits) on the ImageNet sample, beside SPIQ, static per-tensor and
dynamic quantization of the same models. Models whose weights cannot be had are skipped with the
reason. Calibrated methods draw `calib_images` images (seeded) from the same sample. `--toy` runs
the table on a randomly initialised ViT (spiq.vit.toy_vit): its top-1 means nothing, its agreement
with its own float model and logit SQNR do, and so do the timings.

Writes bench/results/vit.json and vit.md (vit_toy_<size>.* with --toy).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.core.metrics import tensor_sqnr_db
from spiq.analysis.evaluate import calibration_subset, load_images

MODELS = ["deit_small_patch16_224", "deit_base_patch16_224"]
# (label, config fields)
ROWS = [
    ("liu-ptq W8A8", {"method": "liu-ptq", "weight_bits": 8, "input_bits": 8}),
    ("liu-ptq W6A6", {"method": "liu-ptq", "weight_bits": 6, "input_bits": 6}),
    ("liu-ptq mixed 8", {"method": "liu-ptq", "weight_bits": 8, "input_bits": 8, "mixed_precision": 8}),
    ("liu-ptq mixed 6", {"method": "liu-ptq", "weight_bits": 6, "input_bits": 6, "mixed_precision": 6}),
    ("spiq W8A8", {"method": "spiq", "weight_bits": 8, "input_bits": 8}),
    ("spiq W6A6", {"method": "spiq", "weight_bits": 6, "input_bits": 6}),
    ("static-tensor W8A8", {"method": "static-tensor", "weight_bits": 8, "input_bits": 8}),
    ("static-tensor W6A6", {"method": "static-tensor", "weight_bits": 6, "input_bits": 6}),
    ("calib-minmax W6A6", {"method": "calib-minmax", "weight_bits": 6, "input_bits": 6}),
    ("dynamic-tensor W6A6", {"method": "dynamic-tensor", "weight_bits": 6, "input_bits": 6}),
    ("dynamic-channel W6A6", {"method": "dynamic-channel", "weight_bits": 6, "input_bits": 6}),
]
# Top-1 % on the full ImageNet validation set, as Liu et al. report them (float, and their method).
PAPER = {
    "deit_small_patch16_224": {"float": 79.8, "liu-ptq mixed 8": 77.47, "liu-ptq mixed 6": 74.58},
    "deit_base_patch16_224": {"float": 81.8, "liu-ptq mixed 8": 81.29},
}
TOY_SIZES = {"tiny": dict(dim=96, depth=2, heads=3), "small": dict(dim=384, depth=12, heads=6)}


@torch.no_grad()
def logits(model, images, batch: int = 25) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def run_model(name: str, model, preprocess, images, labels, calib, rows) -> list[dict]:
    ref = logits(model, images)
    out = [{"label": "float", "top1": float((ref.argmax(1) == labels).float().mean()), "agreement": 1.0,
            "logit_sqnr": float("inf"), "quantize_s": 0.0}]
    tqdm.write(f"{name}: float top-1 {out[0]['top1'] * 100:.1f}")
    for label, fields in tqdm(rows, desc=name, leave=False):
        cfg = spiq.QuantConfig(**fields)
        start = time.perf_counter()
        with tqdm(total=100, desc=label, unit="%", leave=False) as bar:
            q = spiq.quantize(model, cfg, calib_data=calib, preprocess=preprocess,
                              progress=lambda f, _m: bar.update(round(f * 100) - bar.n))
        took = time.perf_counter() - start
        y = logits(q, images)
        r = {"label": label, "config": cfg.to_dict(), "top1": float((y.argmax(1) == labels).float().mean()),
             "agreement": float((y.argmax(1) == ref.argmax(1)).float().mean()), "logit_sqnr": tensor_sqnr_db(ref, y),
             "quantize_s": took}
        report = q.report
        if report.liu is not None:
            r["module_bits"] = report.liu.module_bits
            r["rank_inversions"] = {k: list(v) for k, v in report.liu.inversions.items()}
        out.append(r)
        tqdm.write(f"{name} {label:22s} top-1 {r['top1'] * 100:5.1f}  agreement {r['agreement'] * 100:5.1f}  "
                   f"logit SQNR {r['logit_sqnr']:5.1f} dB  quantized in {took:6.1f} s")
    return out


def table(results: dict, n_images: int, toy: bool) -> str:
    lines = []
    for name, rows in results.items():
        paper = PAPER.get(name, {})
        lines += [f"### {name}", "",
                  f"{n_images} ImageNet sample images" + (" (random weights: top-1 is meaningless)" if toy else "")
                  + ". Paper: Liu et al., full ImageNet validation set.", "",
                  "| method | top-1 % | agreement % | logit SQNR dB | paper top-1 % | quantize s |", "|---|---|---|---|---|---|"]
        for r in rows:
            p = paper.get(r["label"])
            sq = "" if r["label"] == "float" else f"{r['logit_sqnr']:.1f}"
            bits = f" {r['module_bits']}" if r.get("module_bits") else ""
            lines.append(f"| {r['label']}{bits} | {r['top1'] * 100:.1f} | {r['agreement'] * 100:.1f} | {sq} | "
                         f"{p if p is not None else ''} | {r['quantize_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--limit", type=int)
    p.add_argument("--rows", help="comma-separated row labels (default: all)")
    p.add_argument("--toy", action="store_true", help="a random ViT instead of pretrained weights")
    p.add_argument("--toy-size", choices=list(TOY_SIZES), default="tiny")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]

    models, skipped = {}, {}
    if args.toy:
        from spiq.models.vit import toy_vit

        models[f"toy_vit_{args.toy_size}"] = lambda: toy_vit(0, **TOY_SIZES[args.toy_size])[:2]
    else:
        for name in args.models.split(","):
            problem = spiq.availability(name)
            if problem is not None:
                skipped[name] = problem
                print(f"skipping {name}: {problem}")
                continue
            models[name] = (lambda n=name: spiq.load_model(n)[:2])
    results, n_images = {}, 0
    start = time.time()
    for name, build in models.items():
        model, preprocess = build()
        images, labels, _ = load_images(SAMPLE_DIR, preprocess, args.limit)
        n_images = len(labels)
        calib = calibration_subset(images, spiq.QuantConfig().calib_images)
        results[name] = run_model(name, model, preprocess, images, labels, calib, rows)
    md = table(results, n_images, args.toy)
    if skipped:
        md += "\n" + "\n".join(f"- skipped `{n}`: {why}" for n, why in skipped.items()) + "\n"
    print(md)
    save(f"vit_toy_{args.toy_size}" if args.toy else "vit", {
        "models": list(results), "skipped": skipped, "n_images": n_images, "paper": PAPER,
        "calibration": f"{spiq.QuantConfig().calib_images} images drawn (seed 0) from the same sample",
        "machine": machine(), "seconds": time.time() - start, "results": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
