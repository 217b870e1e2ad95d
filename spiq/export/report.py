"""What export_onnx() wrote, and every place where the int8 graph is not the simulation."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spiq.export.grids import Int8Layer
from spiq.export.plan import Plan


@dataclass
class ExportReport:
    """What export_onnx() wrote and every place where the int8 graph is not the simulation."""
    path: str
    quantized: bool
    input_shape: list                         # ["N", 3, 224, 224]
    int8_layers: list[str]                    # conv/linear layers reading a quantized input
    float_layers: list[str]                   # layers left in float (skipped, or a float model)
    mul_layers: dict[str, str]                # layer -> why an explicit per-channel Mul sits before its input
    requantized: dict[str, tuple[float, float]]   # layer -> (min, max) over channels of its int8 step / SPIQ's step
    unified_zero: list[str]                   # layers whose per-channel zero points had to become one (padding)
    extra_quantizers: list[str]               # tensors the int8 graph quantizes and the simulation keeps float
    op_counts: dict[str, int]                 # ONNX ops in the written graph
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = field(default=None, repr=False)

    def summary(self) -> str:
        if not self.quantized or not self.int8_layers:
            return f"{Path(self.path).name}: float graph, {len(self.float_layers)} layers"
        muls = f" ({', '.join(self.mul_layers)})" if self.mul_layers else ""
        parts = [f"{Path(self.path).name}: {len(self.int8_layers)} int8 layers, every activation quantizer per tensor",
                 f"per-channel Mul before {len(self.mul_layers)} layer(s){muls}",
                 f"{len(self.requantized)} layer(s) re-quantized for a shared residual-stream grid",
                 f"{len(self.extra_quantizers)} quantizer(s) the simulation does not have"]
        if self.float_layers:
            parts.append(f"float layers: {', '.join(self.float_layers)}")
        return "; ".join(parts)


def export_report(plan: Plan, proto, path: str, quantized: bool, batch: int | None, extra: list[str]) -> ExportReport:
    """The report of the ONNX graph `proto` built from `plan`, with `extra` the quantizers it added."""
    layers = plan.layers
    if plan.dropped:
        n = sum(k for k, _ in plan.dropped.values())
        worst = max(b for _, b in plan.dropped.values())
        plan.notes.append(f"{n} filter(s) in {len(plan.dropped)} layer(s) have weights so small against their bias "
                          f"(a BN gamma near 0) that the int32 bias cannot hold both: kept as their bias only, which "
                          f"changes those outputs by at most {worst:.1e} of the bias")
    return ExportReport(
        path=path, quantized=quantized, input_shape=[batch or "N", *plan.input_shape],
        int8_layers=[n for n, lp in layers.items() if lp.int8],
        float_layers=[n for n, lp in layers.items() if not lp.int8],
        mul_layers={n: _mul_reason(lp, plan) for n, lp in layers.items()
                    if lp.int8 and lp.enc_in.convert_for and lp.enc_in.has_mul},
        requantized={n: _step_ratios(lp) for n, lp in layers.items() if lp.requantized},
        unified_zero=[n for n, lp in layers.items() if lp.int8 and lp.enc_in.unified],
        extra_quantizers=extra if quantized else [],
        op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        notes=list(plan.notes), plan=plan)


def _mul_reason(lp: Int8Layer, plan: Plan) -> str:
    src = plan.enc_of[lp.op.inputs[0]].root
    what = "the graph input" if src.kind == "input" else f"`{src.name}` ({src.act or src.kind})"
    return f"its per-channel input grid cannot be folded through {what}"


def _step_ratios(lp: Int8Layer) -> tuple[float, float]:
    live = lp.grid.live & lp.spiq_grid.live
    if not live.any():
        return 1.0, 1.0
    r = lp.grid.step[live] / lp.spiq_grid.step[live]
    return float(r.min()), float(r.max())
