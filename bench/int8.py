"""Real int8 speed and accuracy: SPIQ exported to ONNX against ONNX Runtime's own quantizers.

    python -m bench.int8 [--limit N] [--runs R] [--threads T]

EfficientNet-Lite0, CPU, `--threads` intra-op threads (default 2), batch 1 and 16. Latency is
the median of `--runs` timed runs per variant (after warm-up), interleaved across variants in
rounds so that a load change on the machine hits all of them alike; every graph is timed with
its batch size fixed (static shapes). Top-1 is over the image sample.

Variants: PyTorch FP32 (eager), ORT FP32, ORT static int8 (quantize_static: uint8 per-tensor
activations from min/max over the same 32 calibration images the calib-* methods use, int8
per-channel weights, QDQ), ORT dynamic int8 (quantize_dynamic), SPIQ int8 (spiq.export_onnx of
the SPIQ W8A8 config, default fold="auto", and fold="always"). Also the parity of SPIQ int8
with its float simulation: top-1 agreement, logits SQNR, per-layer SQNR; and with the
simulation of the same config with int8_graph=True (the graph's own grids and quantizers).
Writes bench/results/int8.json and int8.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq import export as ex
from spiq.export import runtime as rt
from spiq.analysis.evaluate import calibration_subset, load_images, predict

TARGET_VS_STATIC, TARGET_VS_FP32 = 1.10, 0.60


def interleaved_latency(runners: dict, batch: int, runs: int, rounds: int = 6, warmup: int = 3) -> dict:
    """Per variant: median ms per batch over `runs` runs, taken in `rounds` interleaved rounds."""
    times = {name: [] for name in runners}
    per_round = -(-runs // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            lat = rt.measure_latency(run, batch, per_round, warmup)
            times[name] += lat.times
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10)
        out[name] = {"median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1], "runs": len(t)}
    return out


def session_runner(session, x):
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    return lambda: session.run(None, feed)


def main(argv=None) -> int:
    with tempfile.TemporaryDirectory(prefix="spiq_int8_") as tmp:
        return run(argv, Path(tmp))


# long: one bench, step by step: export every variant, then parity, latency and targets, saved at the end
def run(argv, tmp: Path) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, help="evaluate top-1 on the first N images (default: all)")
    p.add_argument("--runs", type=int, default=36, help="timed runs per variant and batch size (>= 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sqnr-images", type=int, default=32, help="images for the per-layer SQNR")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, preprocess, _ = spiq.load_model("efficientnet_lite0")
    images, labels, _ = load_images(SAMPLE_DIR, preprocess, args.limit)
    calib = calibration_subset(images, spiq.QuantConfig(method="calib-minmax").calib_images)
    configs = {"SPIQ int8": spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8),
               "SPIQ int8 (fold=always)": spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, fold="always")}
    qmodels = {name: spiq.quantize(model, config, preprocess=preprocess) for name, config in configs.items()}

    def build(batch):
        """Every ONNX variant, with this batch size fixed (None: symbolic, for the top-1 runs)."""
        d = tmp / f"batch{batch or 'N'}"
        d.mkdir()
        paths = {"ORT FP32": d / "fp32.onnx", "ORT static int8": d / "static.onnx", "ORT dynamic int8": d / "dynamic.onnx"}
        ex.export_onnx(model, paths["ORT FP32"], batch=batch)
        rt.ort_static_int8(paths["ORT FP32"], paths["ORT static int8"], calib, batch=batch or 1)
        rt.ort_dynamic_int8(paths["ORT FP32"], paths["ORT dynamic int8"])
        for i, name in enumerate(configs):
            paths[name] = d / f"spiq{i}.onnx"
            ex.export_onnx(qmodels[name], paths[name], batch=batch)
        return paths

    paths = build(None)
    spiq_info = {}
    for name, config in configs.items():
        t = time.perf_counter()
        qmodel = qmodels[name]
        report = ex.export_onnx(qmodel, paths[name])
        sim = torch.cat([qmodel(images[i:i + 25]) for i in range(0, len(images), 25)])
        par = rt.parity(qmodel, paths[name], images, labels, sim_logits=sim)
        rows = ex.layer_sqnr(qmodel, report, images[: args.sqnr_images])
        sqnr = [r["sqnr_db"] for r in rows]
        spiq_info[name] = {
            "config": config.to_dict(), "export_and_check_seconds": time.perf_counter() - t,
            "parity": vars(par), "layer_sqnr_db": {r["layer"]: r["sqnr_db"] for r in rows},
            "layer_sqnr_summary": {"min": min(sqnr), "median": statistics.median(sqnr), "max": max(sqnr),
                                   "worst": sorted(rows, key=lambda r: r["sqnr_db"])[0]["layer"]},
            "mul_layers": report.mul_layers, "requantized": report.requantized,
            "extra_quantizers": report.extra_quantizers, "notes": report.notes, "onnx_ops": report.op_counts,
        }
        print(f"{name}: {par.summary()}", file=sys.stderr)
        # the same config with int8_graph=True simulates the very graph written (shared residual grids,
        # quantized residual branches and sums): what is left is float vs integer arithmetic
        twin = spiq.quantize(model, config.replace(int8_graph=True), preprocess=preprocess)
        sim = torch.cat([twin(images[i:i + 25]) for i in range(0, len(images), 25)])
        spiq_info[name]["parity_int8_graph"] = vars(rt.parity(twin, paths[name], images, labels, sim_logits=sim))

    sessions = {name: rt.ort_session(path, args.threads) for name, path in paths.items()}
    ort_ops = {name: rt.optimized_op_counts(path, args.threads) for name, path in paths.items()}
    top1 = {}
    with torch.no_grad():
        top1["PyTorch FP32"] = float((predict(model, images) == labels).float().mean())
    for name, s in sessions.items():
        top1[name] = float((rt.run_onnx(s, images).argmax(1) == labels).float().mean())
    for name in configs:
        top1[f"{name} (simulation)"] = spiq_info[name]["parity"]["top1_sim"]

    latency = {}
    for batch in (1, 16):
        x = images[:batch]
        fixed = build(batch)   # static shapes throughout: what a deployment would run
        runners = {"PyTorch FP32": (lambda x=x: model(x))}
        runners.update({name: session_runner(rt.ort_session(path, args.threads), x) for name, path in fixed.items()})
        with torch.no_grad():
            latency[batch] = interleaved_latency(runners, batch, args.runs)

    order = ["PyTorch FP32", "ORT FP32", "ORT static int8", "ORT dynamic int8", *configs]
    rows = []
    for name in order:
        rows.append({"variant": name, "top1": top1[name],
                     "b1_ms": latency[1][name]["median_ms"], "b16_ms": latency[16][name]["median_ms"],
                     "b1_vs_static": latency[1][name]["median_ms"] / latency[1]["ORT static int8"]["median_ms"],
                     "b1_vs_fp32": latency[1][name]["median_ms"] / latency[1]["ORT FP32"]["median_ms"],
                     "b16_vs_static": latency[16][name]["median_ms"] / latency[16]["ORT static int8"]["median_ms"],
                     "b16_vs_fp32": latency[16][name]["median_ms"] / latency[16]["ORT FP32"]["median_ms"]})
    main_row = next(r for r in rows if r["variant"] == "SPIQ int8")
    static_row = next(r for r in rows if r["variant"] == "ORT static int8")
    targets = {
        "latency_vs_static_b1": {"value": main_row["b1_vs_static"], "target": f"<= {TARGET_VS_STATIC}",
                                 "met": main_row["b1_vs_static"] <= TARGET_VS_STATIC},
        "latency_vs_fp32_b1": {"value": main_row["b1_vs_fp32"], "target": f"<= {TARGET_VS_FP32}",
                               "met": main_row["b1_vs_fp32"] <= TARGET_VS_FP32},
        "latency_vs_static_b16": {"value": main_row["b16_vs_static"], "target": f"<= {TARGET_VS_STATIC}",
                                  "met": main_row["b16_vs_static"] <= TARGET_VS_STATIC},
        "latency_vs_fp32_b16": {"value": main_row["b16_vs_fp32"], "target": f"<= {TARGET_VS_FP32}",
                                "met": main_row["b16_vs_fp32"] <= TARGET_VS_FP32},
        "top1_vs_static": {"value": main_row["top1"] - static_row["top1"], "target": ">= 0",
                           "met": main_row["top1"] >= static_row["top1"]},
        "parity_agreement": {"value": spiq_info["SPIQ int8"]["parity"]["agreement"], "target": ">= 0.99",
                             "met": spiq_info["SPIQ int8"]["parity"]["agreement"] >= 0.99},
        "parity_agreement_int8_graph": {"value": spiq_info["SPIQ int8"]["parity_int8_graph"]["agreement"],
                                        "target": ">= 0.99",
                                        "met": spiq_info["SPIQ int8"]["parity_int8_graph"]["agreement"] >= 0.99},
    }

    n = len(images)
    print(f"EfficientNet-Lite0, {args.threads} threads, median of {args.runs} runs, top-1 on {n} images")
    print(f"{'variant':26} {'top-1':>6} {'b1 ms':>7} {'b16 ms':>7} {'b1/static':>9} {'b1/fp32':>8}")
    for r in rows:
        print(f"{r['variant']:26} {r['top1'] * 100:6.1f} {r['b1_ms']:7.2f} {r['b16_ms']:7.1f} "
              f"{r['b1_vs_static']:9.2f} {r['b1_vs_fp32']:8.2f}")
    for name in configs:
        info = spiq_info[name]
        par, s = info["parity"], info["layer_sqnr_summary"]
        print(f"{name}: agreement with its simulation {par['agreement'] * 100:.1f}%, logits SQNR "
              f"{par['logits_sqnr_db']:.1f} dB; per-layer SQNR simulation vs real {s['min']:.1f}-{s['max']:.1f} dB "
              f"(median {s['median']:.1f}, worst {s['worst']}); per-channel Mul before {len(info['mul_layers'])} "
              f"layers; {len(info['requantized'])} layers re-quantized")
        twin = info["parity_int8_graph"]
        print(f"{name} against its int8_graph simulation: agreement {twin['agreement'] * 100:.1f}%, logits SQNR "
              f"{twin['logits_sqnr_db']:.1f} dB")
    for key, t in targets.items():
        print(f"target {key}: {t['value']:.3f} ({t['target']}) {'met' if t['met'] else 'NOT met'}")
    md = ["| variant | top-1 % | batch 1 ms | batch 16 ms | b1 × static | b1 × FP32 |", "|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['top1'] * 100:.1f} | {r['b1_ms']:.2f} | {r['b16_ms']:.1f} | "
           f"{r['b1_vs_static']:.2f} | {r['b1_vs_fp32']:.2f} |" for r in rows]
    md += ["", "| SPIQ int8 (ONNX Runtime) against | top-1 agreement % | logits SQNR dB |", "|---|---|---|"]
    for label, key in (("the config's simulation", "parity"), ("its int8_graph simulation", "parity_int8_graph")):
        par = spiq_info["SPIQ int8"][key]
        md.append(f"| {label} | {par['agreement'] * 100:.1f} | {par['logits_sqnr_db']:.1f} |")
    save("int8", {"n_images": n, "threads": args.threads, "runs": args.runs,
                  "machine": {**machine(), "load_average_after": os.getloadavg()},
                  "onnxruntime": _ort_version(), "results": rows, "latency": latency, "top1": top1,
                  "ort_ops": ort_ops, "spiq": spiq_info, "targets": targets}, "\n".join(md) + "\n")
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(main())
