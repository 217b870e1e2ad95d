"""Accuracy of every method at every bit width on the real ImageNet sample (EfficientNet-Lite0 by default).

    python -m bench.accuracy [--model efficientnet_lite1,efficientnet_lite2] [--limit N]
                             [--methods "spiq,static-tensor (BN)"] [--bits W8A4,W8A8]

Writes bench/results/accuracy.json and accuracy.md for EfficientNet-Lite0 (the tables in the
README) and accuracy_<model>.json / .md for any other --model (same schema): every method at
every bit width (defaults: with the bias fit on images distilled from the BN statistics), SPIQ's
difference from each baseline with its ~95 % interval, the competing methods again without that fit
(`bias_images=0`: the per-layer law's correction only), and the data-free weight-side options at
W4A8 (rounding, clipping, cross-layer equalization, per-tensor weights).
Calibrated methods draw their 32 images from the sample (seeded) and every method is scored on
the other images, so no method is scored on what it calibrated on; nothing else sees the labels.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.analysis.evaluate import calibration_split, evaluate, load_images, logits, paired_difference
from spiq.models.registry import get_spec

BITS = ["W8A8", "W8A6", "W6A6", "W8A5", "W8A4", "W4A8", "W4A4"]
# (label, config fields): the calibrated rows per tensor (their default) and the best of them per channel.
METHODS = [
    ("spiq", {"method": "spiq"}),
    ("static-tensor (BN)", {"method": "static-tensor"}),
    ("calib-minmax", {"method": "calib-minmax"}),
    ("calib-percentile", {"method": "calib-percentile"}),
    ("calib-mse", {"method": "calib-mse"}),
    ("calib-mse (per channel)", {"method": "calib-mse", "input_granularity": "channel"}),
    ("dynamic-tensor", {"method": "dynamic-tensor"}),
    ("dynamic-channel", {"method": "dynamic-channel"}),
]


# The weight side at 4 bits, for the two data-free methods: (label, config fields).
WEIGHT_BITS = "W4A8"
WEIGHT_OPTIONS = [
    ("round to nearest", {"weight_rounding": "nearest"}),
    ("round to nearest, MSE clipping", {"weight_rounding": "nearest", "weight_clip": "mse"}),
    ("SQuant (default)", {}),
    ("SQuant, MSE clipping", {"weight_clip": "mse"}),
    ("SQuant, cross-layer equalization", {"equalize": True}),
    ("per-tensor weights, SQuant", {"weight_granularity": "tensor"}),
    ("per-tensor weights, SQuant, cross-layer equalization", {"weight_granularity": "tensor", "equalize": True}),
]

# The methods that compete at low input bits, again without the sequential bias correction on
# images distilled from BN statistics (on by default): what the fit adds to each.
BIAS_FIT = ["spiq", "static-tensor (BN)", "calib-mse", "dynamic-tensor", "dynamic-channel"]


DEFAULT_MODEL = "efficientnet_lite0"


def output_name(out: str, model: str) -> str:
    """Lite0's results keep the plain name (the README's tables); every other model gets its own file."""
    return out if model == DEFAULT_MODEL else f"{out}_{model}"


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def options_table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Weight-side options at {WEIGHT_BITS} (same cells):", "",
             "| weights | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = [next((f"{r['top1'] * 100:.1f} / {r['agreement'] * 100:.1f} / {r['logit_sqnr_db']:.1f}"
                       for r in rows if r["label"] == label and r["method"] == m), "") for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences(results: list[dict], agrees: dict) -> list[dict]:
    """SPIQ's agreement minus each baseline's on the same images, with a paired ~95 % half-width."""
    rows = []
    for r in results:
        if r["label"] != "spiq" and ("spiq", r["bits"]) in agrees:
            d, h = paired_difference(agrees["spiq", r["bits"]], agrees[r["label"], r["bits"]])
            rows.append({"baseline": r["label"], "bits": r["bits"], "difference": d, "half_width_95": h})
    return rows


def difference_table(rows: list[dict], bits: list[str]) -> str:
    lines = ["SPIQ's agreement minus each baseline's, points, with the ~95 % interval of a paired difference "
             "(only the images on which the two differ count):", "",
             "| baseline | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for label in dict.fromkeys(r["baseline"] for r in rows):
        cells = [next((f"{r['difference'] * 100:+.1f} ± {r['half_width_95'] * 100:.1f}" for r in rows
                       if r["baseline"] == label and r["bits"] == b), "") for b in bits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bias_table(rows: list[dict], results: list[dict], bits: list[str]) -> str:
    lines = ["Without the bias fit (`bias_images=0`: the per-layer law's bias correction only; same cells, then the "
             "logit SQNR the fit on 8 distilled images adds, from the first table):", "",
             "| method | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = []
        for b in bits:
            r = next((r for r in rows if r["label"] == label and r["bits"] == b), None)
            base = next((x for x in results if x["label"] == label and x["bits"] == b), None)
            gain = f" ({base['logit_sqnr_db'] - r['logit_sqnr_db']:+.1f})" if r and base else ""
            cells.append(f"{r['top1'] * 100:.1f} / {r['agreement'] * 100:.1f} / {r['logit_sqnr_db']:.1f}{gain}"
                         if r else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(results: list[dict], fp_top1: float, bits: list[str], model: str = DEFAULT_MODEL) -> str:
    title = get_spec(model).description.split(",")[0]
    lines = [f"{title}, {results[0]['n_images'] if results else 0} ImageNet sample images (not the 32 "
             f"calibration images); "
             f"float top-1 {fp_top1 * 100:.1f} %. Cells: top-1 % / agreement with float top-1 % / "
             "mean logit SQNR against the float model, dB (steadier than agreement: one image is "
             f"{100 / results[0]['n_images'] if results else 0:.1f} points).", "",
             "| method | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for label in dict.fromkeys(r["label"] for r in results):
        cells = []
        for b in bits:
            r = next((r for r in results if r["label"] == label and r["bits"] == b), None)
            cells.append(f"{r['top1'] * 100:.1f} / {r['agreement'] * 100:.1f} / {r['logit_sqnr_db']:.1f}" if r else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append",
                   help=f"model name(s), repeatable or comma-separated (default: {DEFAULT_MODEL})")
    p.add_argument("--limit", type=int)
    p.add_argument("--methods", help="comma-separated labels (default: all)")
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--out", default="accuracy", help="results name; other models than Lite0 get _<model> appended")
    p.add_argument("--no-weight-options", action="store_true", help=f"skip the {WEIGHT_BITS} weight-side table")
    p.add_argument("--no-bias-images", action="store_true", help="skip the table without the bias fit")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    models = [m for arg in args.model or [DEFAULT_MODEL] for m in arg.split(",") if m]
    for name in models:   # an unknown name fails before any work
        try:
            get_spec(name)
        except KeyError as exc:
            p.error(exc.args[0])
    bits = args.bits.split(",")
    labels = [m[0] for m in METHODS]
    unknown = [m for m in (args.methods or "").split(",") if m and m not in labels]
    if unknown:
        p.error(f"unknown method label(s) {unknown}; known: {labels}")
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods.split(",")]
    for name in models:
        score_model(name, args, bits, methods)
    return 0


def score_model(name: str, args, bits: list[str], methods: list) -> None:
    loaded = spiq.load_model(name)
    model, preprocess = loaded.model, loaded.preprocess
    images, labels, _ = load_images(SAMPLE_DIR, preprocess, args.limit)
    calib_idx, held_out = calibration_split(len(images), 32)
    calib, images, labels = images[calib_idx], images[held_out], labels[held_out]
    fp_logits = logits(model, images)
    fp_pred = fp_logits.argmax(1)
    fp_top1 = (fp_pred == labels).float().mean().item()
    results, agrees, unfitted = [], {}, []
    start = time.time()
    for b in tqdm(bits, desc=f"{name} bit widths"):
        w, a = parse_bits(b)
        runs = [(label, fields, results) for label, fields in methods]
        if not args.no_bias_images:
            runs += [(label, {**fields, "bias_images": 0}, unfitted) for label, fields in methods
                     if label in BIAS_FIT]
        for label, fields, rows in tqdm(runs, desc=b, leave=False):
            cfg = spiq.QuantConfig(weight_bits=w, input_bits=a, **fields)
            r = evaluate(name, images, labels, cfg, calib=calib, float_model=loaded, fp_logits=fp_logits)
            rows.append({"label": label, "bits": b, "config": cfg.to_dict(), **r.to_dict()})
            if rows is results:
                agrees[label, b] = r.predictions == fp_pred
            tqdm.write(f"{b:5s} {label:26s} {'no bias fit' if rows is unfitted else '':11s} top-1 {r.top1 * 100:5.1f}  "
                       f"agreement {r.agreement * 100:5.1f}  logit SQNR {r.logit_sqnr_db:5.1f} dB")
    options = []
    if not args.no_weight_options:
        w, a = parse_bits(WEIGHT_BITS)
        for label, fields in tqdm(WEIGHT_OPTIONS, desc=f"{WEIGHT_BITS} weight options"):
            for method in ("spiq", "static-tensor"):
                cfg = spiq.QuantConfig(method=method, weight_bits=w, input_bits=a, **fields)
                r = evaluate(name, images, labels, cfg, calib=calib, float_model=loaded, fp_logits=fp_logits)
                options.append({"label": label, "method": method, "config": cfg.to_dict(), **r.to_dict()})
                tqdm.write(f"{WEIGHT_BITS} {method:14s} {label:52s} top-1 {r.top1 * 100:5.1f}  "
                           f"agreement {r.agreement * 100:5.1f}  logit SQNR {r.logit_sqnr_db:5.1f} dB")
    diffs = differences(results, agrees)
    md = table(results, fp_top1, bits, name) + "\n" + difference_table(diffs, bits) + (
        "\n" + bias_table(unfitted, results, bits) if unfitted else "") + (
        "\n" + options_table(options) if options else "")
    print(md)
    save(output_name(args.out, name), {
        "model": name, "n_images": len(labels), "top1_fp": fp_top1,
        "calibration": "32 images drawn (seed 0) from the sample; every method scored on the others",
        "machine": machine(), "seconds": time.time() - start, "results": results,
        "differences": diffs, "without_bias_fit": unfitted, "weight_options": options}, md)


if __name__ == "__main__":
    sys.exit(main())
