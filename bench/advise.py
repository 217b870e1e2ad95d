"""Mixed-precision recipes advised from distilled images, against uniform widths, on real images.

    python -m bench.advise [--limit N] [--budgets 4.0,4.5,5.0,6.0] [--widths 3,4,5,6,8] [--no-real]

The advisor (`spiq advise`: the data-free sensitivity table, then an exact dynamic programme over
additive noise) picks per-layer input widths from 3,4,5,6,8 for SPIQ with 8-bit weights under an
average-input-bits budget. Each recipe is scored on the ImageNet sample against the float model,
beside uniform W8A4/A5/A6: top-1, agreement with float top-1, mean logit SQNR, and the paired ~95 %
interval of the agreement difference (bench/accuracy.py's). Beside it, the same search driven by
32 real images (the calibration split of bench/accuracy.py) instead of distilled ones. Every row
is scored on the other images. Writes bench/results/advise.json and advise.md, and the budget
curve docs/advise-budgets.svg that the README shows.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.analysis.advise import advise
from spiq.analysis.evaluate import calibration_split, load_images, logits, paired_difference
from spiq.analysis.sensitivity import predicted_sqnr_db, sensitivity
from spiq.core.metrics import mean_logit_sqnr_db
from spiq.quantize.memo import Memo

UNIFORM = (4, 5, 6, 8)
CURVE = Path(__file__).resolve().parents[1] / "docs" / "advise-budgets.svg"
# (advised row, uniform row it is held against)
VERSUS = [("advised 4.5 (distilled)", "uniform W8A5"), ("advised 4.5 (distilled)", "uniform W8A4"),
          ("advised 4.0 (distilled)", "uniform W8A4"), ("advised 4.5 (real)", "uniform W8A5"),
          ("advised 4.0 (real)", "uniform W8A4"), ("advised 4.5 (distilled)", "advised 4.5 (real)"),
          ("advised 4.0 (distilled)", "advised 4.0 (real)")]


def score(label, q, images, labels, fp_logits, extra=None) -> tuple[dict, torch.Tensor]:
    out = logits(q, images)
    pred, fp_pred = out.argmax(1), fp_logits.argmax(1)
    row = {"label": label, "top1": (pred == labels).float().mean().item(),
           "agreement": (pred == fp_pred).float().mean().item(),
           "logit_sqnr_db": mean_logit_sqnr_db(fp_logits, out), **(extra or {})}
    tqdm.write(f"{label:26s} top-1 {row['top1'] * 100:5.1f}  agreement {row['agreement'] * 100:5.1f}  "
               f"logit SQNR {row['logit_sqnr_db']:5.2f} dB")
    return row, pred == fp_pred


def markdown(data: dict) -> str:
    n = data["n_images"]
    lines = [f"EfficientNet-Lite0, SPIQ, 8-bit weights, {n} ImageNet sample images (not the 32 calibration "
             f"images); float top-1 {data['top1_fp'] * 100:.1f} %. Advised: per-layer input widths from "
             f"{','.join(map(str, data['widths']))} under an average-input-bits budget (weighted by input values per image).",
             "", "| recipe | avg input bits | predicted SQNR, dB | top-1 % | agreement % | logit SQNR, dB |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        pred = f"{r['predicted_sqnr_db']:.1f}" if r.get("predicted_sqnr_db") is not None else ""
        lines.append(f"| {r['label']} | {r['input_budget_used']:.3f} | {pred} | {r['top1'] * 100:.1f} | "
                     f"{r['agreement'] * 100:.1f} | {r['logit_sqnr_db']:.2f} |")
    lines += ["", "Agreement difference, points, with the ~95 % interval of a paired difference (bench/accuracy.py's); "
              "logit SQNR difference, dB:", "", "| advised | against | agreement | logit SQNR |", "|---|---|---|---|"]
    for d in data["differences"]:
        lines.append(f"| {d['a']} | {d['b']} | {d['difference'] * 100:+.1f} ± {d['half_width_95'] * 100:.1f} | "
                     f"{d['sqnr_difference_db']:+.2f} |")
    lines += ["", f"Sensitivity on 8 distilled images: {data['seconds_sensitivity']:.0f} s; "
              f"on 32 real images: {data.get('seconds_sensitivity_real', 0):.0f} s (2 shared cores)."]
    return "\n".join(lines) + "\n"


def plot_curve(data: dict, path: Path) -> None:
    """Agreement and logit SQNR against average input bits: uniform widths, advised from distilled
    images, advised from real ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for kind, style in (("uniform", "s--"), ("(distilled)", "o-"), ("(real)", "^:")):
        rows = sorted((r for r in data["rows"] if kind in r["label"]), key=lambda r: r["input_budget_used"])
        x = [r["input_budget_used"] for r in rows]
        name = {"uniform": "uniform W8A<b>", "(distilled)": "advised, distilled images", "(real)": "advised, 32 real images"}
        axes[0].plot(x, [r["agreement"] * 100 for r in rows], style, label=name[kind])
        axes[1].plot(x, [r["logit_sqnr_db"] for r in rows], style, label=name[kind])
    for ax, label in zip(axes, ("agreement with float top-1, %", "logit SQNR, dB")):
        ax.set_xlabel("average input bits (8-bit weights)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"EfficientNet-Lite0, SPIQ, {data['n_images']} held-out ImageNet sample images", fontsize=10)
    fig.tight_layout()
    plt.rcParams["svg.hashsalt"] = "spiq"   # stable ids: the file changes only when the numbers do
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def differences(rows: dict, agrees: dict) -> list[dict]:
    out = []
    for a, b in VERSUS:
        if a in agrees and b in agrees:
            d, h = paired_difference(agrees[a], agrees[b])
            out.append({"a": a, "b": b, "difference": d, "half_width_95": h,
                        "sqnr_difference_db": rows[a]["logit_sqnr_db"] - rows[b]["logit_sqnr_db"]})
    return out


def main(argv=None) -> int:  # long: one linear run of the benchmark, saved after each stage
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int)
    p.add_argument("--budgets", default="4.0,4.5,5.0,6.0")
    p.add_argument("--widths", default="3,4,5,6,8", help="input widths the advisor chooses from")
    p.add_argument("--no-real", action="store_true", help="skip the search driven by 32 real images")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",")]
    widths = [int(b) for b in args.widths.split(",")]
    loaded = spiq.load_model("efficientnet_lite0")
    images, labels, _ = load_images(SAMPLE_DIR, loaded.preprocess, args.limit)
    calib_idx, held_out = calibration_split(len(images), 32)
    calib, images, labels = images[calib_idx], images[held_out], labels[held_out]
    fp_logits = logits(loaded.model, images)
    base = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4)
    memo = Memo(loaded)
    rows, agrees = {}, {}
    data = {"model": "efficientnet_lite0", "n_images": len(labels), "widths": widths, "machine": machine(),
            "top1_fp": (fp_logits.argmax(1) == labels).float().mean().item(), "rows": [], "differences": [],
            "calibration": "32 images drawn (seed 0) from the sample, as bench/accuracy.py; every row scored on the others"}

    def run(label, config, extra):
        q = spiq.quantize(loaded, config, memo=memo)
        rows[label], agrees[label] = score(label, q, images, labels, fp_logits, extra)
        data["rows"] = list(rows.values())
        data["differences"] = differences(rows, agrees)
        save("advise", data, markdown(data))

    start = time.time()
    table = sensitivity(loaded, base, sorted(set(widths) | set(UNIFORM)), memo=memo)
    data["seconds_sensitivity"] = time.time() - start
    data["sensitivity"] = [vars(r) for r in table]
    for b in UNIFORM:
        noise = sum(r.noise("input", b) + r.noise("weight", base.weight_bits) for r in table)
        run(f"uniform W8A{b}", base.replace(input_bits=b),
            {"input_budget_used": float(b), "predicted_sqnr_db": predicted_sqnr_db(noise)})
    for budget in tqdm(budgets, desc="budgets"):
        adv = advise(table, base, budget, widths)
        run(f"advised {budget:.1f} (distilled)", adv.config, {"budget": budget, **adv.to_dict()})
    if not args.no_real:
        start = time.time()
        real = sensitivity(loaded, base, widths, images=calib, memo=memo)
        data["seconds_sensitivity_real"] = time.time() - start
        data["sensitivity_real"] = [vars(r) for r in real]
        for budget in budgets:
            adv = advise(real, base, budget, widths)
            run(f"advised {budget:.1f} (real)", adv.config, {"budget": budget, **adv.to_dict()})
    plot_curve(data, CURVE)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
