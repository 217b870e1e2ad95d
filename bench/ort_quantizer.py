"""SPIQ int8 through ONNX Runtime's own quantizer: the hand-written QDQ graph against quantize_static
fed SPIQ's grids as explicit overrides.

    python -m bench.ort_quantizer [--limit N] [--runs R] [--threads T]

EfficientNet-Lite0, the SPIQ W8A8 config of bench/int8.py, quantized with int8_graph=True (the
simulation of the very graph written). Two int8 ONNX graphs of it:

- hand-written: spiq.export_onnx (spiq/export/emit.py writes every QuantizeLinear/DequantizeLinear);
- ORT quantizer: the folded float model (SPIQ's per-channel input grids folded into the weights and
  biases: every tensor in its transformed domain, each weight exactly its int8 codes times one scale
  per output channel) exported with torch.onnx, then onnxruntime.quantization.quantize_static with
  extra_options["TensorQuantOverrides"]: per activation tensor the per-tensor (scale, zero point) of
  the export plan (`spiq.export.plan.node_quant`, the layer's `enc_in`), per weight the per-output-
  channel scales (axis 0) and zero point 0. A dummy CalibrationDataReader (2 images): the overrides
  fix every quantized tensor. The script then reads the written initializers back and checks that
  every QuantizeLinear uses the overridden (scale, zero point) and every weight the plan's codes.
  That graph's making and the read-back live in bench/ort_quantizer_setup.py.

Measured: parity of each graph with the int8-graph simulation over the image sample (top-1
agreement, target >= 99 %, and logits SQNR), top-1 against labels, the two graphs against each
other, latency at batch 1 and 16 (median of --runs runs per variant, interleaved round by round,
every graph with its batch fixed), node counts by op type (as written, and as ONNX Runtime runs
them after its QDQ fusions). Writes bench/results/ort_quantizer.json and ort_quantizer.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq import export as ex
from spiq.export import runtime as rt
from spiq.core.metrics import tensor_sqnr_db
from spiq.analysis.evaluate import load_images

from bench.int8 import interleaved_latency, session_runner   # bench/int8.py's helpers
from bench.ort_quantizer_setup import (check_overrides, excluded_nodes, export_folded_float, onnx_values, ort_quantize,
                                       overrides_for)

TARGET_AGREEMENT = 0.99
CONFIG = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8)   # bench/int8.py's "SPIQ int8"


def quantized(loaded: spiq.LoadedModel, config: spiq.QuantConfig) -> spiq.QuantResult:
    """What quantize() returns for `config` (the model's preprocess gives the first layer's range)."""
    return spiq.quantize(loaded, config)


# --- the two graphs against each other, with their batch fixed ----------------------------------

def bias_codes_against(hand: Path, ortq: Path, layers) -> dict:
    """int32 bias codes and scales of the ORT-quantizer graph against the hand-written graph's."""
    import onnx
    from onnx import numpy_helper

    def inits(p):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}

    h, o = inits(hand), inits(ortq)
    diff, scale_equal, worst = 0, 0, 0
    for name in layers:
        hb, ob = h[f"{name}_b"].astype(np.int64), o[f"convs.{name}.bias_quantized"].astype(np.int64)
        diff += int((hb != ob).sum())
        worst = max(worst, int(np.abs(hb - ob).max()))
        scale_equal += bool(np.array_equal(h[f"{name}_b_scale"], o[f"convs.{name}.bias_quantized_scale"]))
    return {"layers": len(layers), "bias_codes_different": diff, "max_code_difference": worst,
            "layers_with_equal_bias_scales": scale_equal,
            "weight_codes_equal": sum(bool(np.array_equal(h[f"{n}_w"], o[f"convs.{n}.weight_quantized"])) for n in layers)}


def fix_batch(src: Path, dst: Path, batch: int) -> None:
    """A copy of an ONNX graph with its batch dimension fixed (static shapes, as bench/int8.py times)."""
    import onnx

    m = onnx.load(str(src))
    for v in list(m.graph.input) + list(m.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        d.ClearField("dim_param")
        d.dim_value = batch
    del m.graph.value_info[:]
    onnx.save(m, str(dst))


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(sorted(Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()))


# --- the bench ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    with tempfile.TemporaryDirectory(prefix="spiq_ortq_") as tmp:
        return run(argv, Path(tmp))


# long: one bench, step by step: both graphs, their checks, parity and latency, saved at the end
def run(argv, tmp: Path) -> int:
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, help="evaluate on the first N images (default: all)")
    p.add_argument("--runs", type=int, default=36, help="timed runs per variant and batch size")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = spiq.load_model("efficientnet_lite0")
    images, labels, _ = load_images(SAMPLE_DIR, loaded.preprocess, args.limit)
    twin = quantized(loaded, CONFIG.replace(int8_graph=True))   # simulates the int8 graph; exports its source's graph

    paths = {"hand-written": tmp / "hand.onnx", "ORT quantizer": tmp / "ortq.onnx"}
    report = ex.export_onnx(twin, paths["hand-written"])
    plan = report.plan
    float_path = tmp / "folded_float.onnx"
    folded = export_folded_float(plan, float_path, plan.input_shape)
    import onnx

    proto = onnx.load(str(float_path))
    val = onnx_values(proto, plan)
    overrides, act, weights = overrides_for(plan, folded, val)
    exclude = excluded_nodes(proto, folded)
    options = ort_quantize(float_path, paths["ORT quantizer"], overrides, exclude, images[:2])
    check = check_overrides(paths["ORT quantizer"], act, weights)
    print(f"overrides read back: {check['activation_ok']}/{check['activation_quantizers']} activation quantizers as "
          f"asked ({len(check['not_overridden'])} not overridden, {len(check['mismatched'])} different); "
          f"{check['weight_scales_ok']}/{check['weights']} weight scales, {check['weight_codes_ok']} weight codes as "
          f"the plan's", file=sys.stderr)

    check["against_hand_written"] = bias_codes_against(paths["hand-written"], paths["ORT quantizer"], list(folded.weights))
    print(f"against the hand-written graph: {check['against_hand_written']}", file=sys.stderr)
    # the exported float graph against the torch module it came from (torch.onnx and the Pad folding)
    with torch.no_grad():
        fl_torch = folded(images[:32])
    fl_onnx = rt.run_onnx(rt.ort_session(float_path, args.threads), images[:32])
    folded_check = {"images": 32, "logits_sqnr_db_onnx_vs_torch": tensor_sqnr_db(fl_torch, fl_onnx),
                    "pads_folded_into_conv": folded.n_pads_folded}

    with torch.no_grad():
        sim = torch.cat([twin(images[i:i + 25]) for i in range(0, len(images), 25)])
    sessions = {name: rt.ort_session(path, args.threads) for name, path in paths.items()}
    logits = {name: rt.run_onnx(s, images) for name, s in sessions.items()}
    parity = {name: vars(rt.parity(twin, sessions[name], images, labels, sim_logits=sim)) for name in paths}
    a, b = logits["hand-written"], logits["ORT quantizer"]
    between = {"agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
               "logits_sqnr_db": tensor_sqnr_db(a, b), "identical_logits": bool(torch.equal(a, b)),
               "max_abs_logit_diff": float((a - b).abs().max())}
    counts = {name: op_counts(path) for name, path in paths.items()}
    ort_ops = {name: rt.optimized_op_counts(path, args.threads) for name, path in paths.items()}

    latency = {}
    for batch in (1, 16):
        x = images[:batch] if len(images) >= batch else images[:1].repeat(batch, 1, 1, 1)
        fixed = {"hand-written": tmp / f"hand_b{batch}.onnx", "ORT quantizer": tmp / f"ortq_b{batch}.onnx"}
        ex.export_onnx(twin, fixed["hand-written"], batch=batch)
        fix_batch(paths["ORT quantizer"], fixed["ORT quantizer"], batch)
        runners = {name: session_runner(rt.ort_session(path, args.threads), x) for name, path in fixed.items()}
        latency[batch] = interleaved_latency(runners, batch, args.runs)

    rows = []
    for name in paths:
        par = parity[name]
        rows.append({"variant": name, "agreement": par["agreement"], "logits_sqnr_db": par["logits_sqnr_db"],
                     "top1": par["top1_real"], "b1_ms": latency[1][name]["median_ms"],
                     "b16_ms": latency[16][name]["median_ms"]})
    hw, oq = rows
    ratio = {"b1": oq["b1_ms"] / hw["b1_ms"], "b16": oq["b16_ms"] / hw["b16_ms"]}
    targets = {name: {"value": parity[name]["agreement"], "target": f">= {TARGET_AGREEMENT}",
                      "met": parity[name]["agreement"] >= TARGET_AGREEMENT} for name in paths}
    hand_nodes = {
        "graph input conversion (Mul/Add, excluded)": exclude,
        "note": "TensorQuantOverrides take one (scale, zero point) per activation tensor (per-channel 'axis' "
                "only for initializers), so a per-channel input grid on a fixed-domain tensor needs an explicit "
                "per-channel Mul/Add in float before the quantizer; EfficientNet-Lite0's stem grid is per tensor, "
                "so none is needed here",
    }

    n = len(images)
    print(f"EfficientNet-Lite0, SPIQ W8A8 (int8_graph), {args.threads} threads, median of {args.runs} runs, "
          f"{n} images, onnxruntime {onnxruntime.__version__}")
    print(f"{'variant':14} {'agree %':>8} {'SQNR dB':>8} {'top-1 %':>8} {'b1 ms':>7} {'b16 ms':>7}")
    for r in rows:
        print(f"{r['variant']:14} {r['agreement'] * 100:8.1f} {r['logits_sqnr_db']:8.1f} {r['top1'] * 100:8.1f} "
              f"{r['b1_ms']:7.2f} {r['b16_ms']:7.1f}")
    print(f"ratio ORT quantizer / hand-written: batch 1 {ratio['b1']:.3f}, batch 16 {ratio['b16']:.3f}")
    print(f"graphs against each other: agreement {between['agreement'] * 100:.1f}%, logits SQNR "
          f"{between['logits_sqnr_db']:.1f} dB, identical logits {between['identical_logits']}")
    print(f"folded float graph (ONNX Runtime) vs its torch module: {folded_check['logits_sqnr_db_onnx_vs_torch']:.1f} dB")
    for name in paths:
        print(f"{name} nodes: {counts[name]}")
        print(f"{name} as ONNX Runtime runs it: {ort_ops[name]}")

    ops = sorted(set(counts["hand-written"]) | set(counts["ORT quantizer"]))
    run_ops = sorted(set(ort_ops["hand-written"]) | set(ort_ops["ORT quantizer"]))
    md = [f"EfficientNet-Lite0, SPIQ W8A8, {n} images, {args.threads} threads, median of {args.runs} interleaved "
          f"runs, onnxruntime {onnxruntime.__version__}", "",
          "| int8 graph | top-1 agreement with int8_graph sim % | logits SQNR dB | top-1 % | batch 1 ms | batch 16 ms |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['agreement'] * 100:.1f} | {r['logits_sqnr_db']:.1f} | {r['top1'] * 100:.1f} | "
           f"{r['b1_ms']:.2f} | {r['b16_ms']:.1f} |" for r in rows]
    md += [f"| ratio ORT quantizer / hand-written | | | | {ratio['b1']:.3f} | {ratio['b16']:.3f} |", "",
           f"The two graphs against each other: top-1 agreement {between['agreement'] * 100:.1f} %, logits SQNR "
           f"{between['logits_sqnr_db']:.1f} dB. Overrides read back: {check['activation_ok']}/"
           f"{check['activation_quantizers']} activation quantizers, {check['weight_scales_ok']}/{check['weights']} "
           f"weight scales, {check['weight_codes_ok']}/{check['weights']} weight codes as asked.", "",
           "| op (as written) | hand-written | ORT quantizer |", "|---|---|---|"]
    md += [f"| {o} | {counts['hand-written'].get(o, 0)} | {counts['ORT quantizer'].get(o, 0)} |" for o in ops]
    md += ["", "| op (as ONNX Runtime runs it) | hand-written | ORT quantizer |", "|---|---|---|"]
    md += [f"| {o} | {ort_ops['hand-written'].get(o, 0)} | {ort_ops['ORT quantizer'].get(o, 0)} |" for o in run_ops]
    save("ort_quantizer", {
        "n_images": n, "threads": args.threads, "runs": args.runs, "onnxruntime": onnxruntime.__version__,
        "machine": {**machine(), "load_average_after": os.getloadavg()}, "config": CONFIG.to_dict(),
        "results": rows, "ratio_ort_quantizer_over_hand_written": ratio, "latency": latency, "parity": parity,
        "between_graphs": between, "targets": targets, "node_counts": counts, "ort_ops": ort_ops,
        "quantize_static_options": options, "overrides": {"activation_tensors": len(act), "weights": len(weights)},
        "override_check": check, "folded_float_check": folded_check, "hand_written_nodes": hand_nodes,
        "export_notes": report.notes, "seconds": time.perf_counter() - t0}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
