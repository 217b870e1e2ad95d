"""The export plan: the lowered graph, every layer's plan, every domain solved, and the quantizers
the int8 kernels add in front of a global pool; what a node's quantizer is."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spiq.export.grids import QMAX, Enc, Grid, Int8Layer, int8_layer
from spiq.export.lower import Op, graph_ops, trace_shaped
from spiq.export.scales import build_encs, conversion, solve_group
from spiq.export.support import ExportError
from spiq.quantize.report import QuantPlan
from spiq.ranges.laws import clip_range


@dataclass
class Plan:
    """Everything the export decided about the graph; `emit` fills `probes` and `q_points`."""
    ops: list[Op]
    encs: list[Enc]
    enc_of: dict[str, Enc]
    layers: dict[str, Int8Layer]
    users: dict[str, list[str]]
    input_shape: tuple[int, int, int]
    notes: list[str]
    probes: dict[str, str] = field(default_factory=dict)   # int8 layer -> the QuantizeLinear output it reads
    q_points: dict[str, Grid] = field(default_factory=dict)   # fx node -> the grid of the quantizer after it
    # nodes before a global pool, in their domain: their own per-tensor (S, Z), or None: float
    pre_pool: dict[str, tuple[float, int] | None] = field(default_factory=dict)
    dropped: dict[str, tuple[int, float]] = field(default_factory=dict)   # layer -> (filters, bound) kept as bias


def plan_export(model: nn.Module, input_shape: tuple[int, int, int], report: QuantPlan | None = None) -> Plan:
    """Lower `model` (BN folded) for (1, *input_shape) inputs and solve every domain of its int8 graph.
    `report`: what quantize() decided for `model` (None: a float model)."""
    gm = trace_shaped(model, input_shape)
    ops = graph_ops(gm)
    by_name = {op.name: op for op in ops}
    users: dict[str, list[str]] = {op.name: [] for op in ops}
    for op in ops:
        for x in op.inputs:
            users[x].append(op.name)
    decided = report.layers if report is not None else {}
    layers = {op.target: int8_layer(op, by_name[op.inputs[0]].shape, decided.get(op.target))
              for op in ops if op.kind == "layer"}
    out_src = by_name[[op for op in ops if op.kind == "output"][0].inputs[0]]
    if len(out_src.shape) != 2:
        raise ExportError(f"cannot export: the model's output `{out_src.name}` is not (batch, classes) logits")
    encs, enc_of = build_encs(ops, users, layers)
    order = {e.id: i for i, e in enumerate(encs)}
    adds = [op for op in ops if op.kind == "add"]
    groups: dict[int, list[Enc]] = {}
    for e in encs:
        groups.setdefault(e.group, []).append(e)
    for members in groups.values():
        if members[0].fixed:
            for e in members:
                e.identity()
        else:
            solve_group(members, layers, report, adds, enc_of, order)
    notes: list[str] = []
    for lp in layers.values():
        src = enc_of[lp.op.inputs[0]]
        lp.enc_in = conversion(lp, src, encs) if lp.int8 and src.fixed else src
    plan = Plan(ops, encs, enc_of, layers, users, input_shape, notes)
    _plan_pre_pool(plan, report)
    for op in ops:
        if op.kind == "relu" and op.cap is not None and node_quant(plan, op.name) is not None \
                and not cap_subsumed(plan, op.name, op.cap):
            notes.append(f"{op.name}: some channel's range reaches above the ReLU6 cap, so the cap stays an "
                         "explicit op (not fused)")
    return plan


def _plan_pre_pool(plan: Plan, report: QuantPlan | None) -> None:
    """Quantizers of the tensor in front of a global pool (an int8 pool reads and writes uint8).

    It shares the pooled tensor's domain but not its range: per position its values reach far
    beyond their average, so it gets its own per-tensor scale, covering [0, cap] of a ReLU6 (or
    the data-free law's range). That works where the domain is per tensor (a uniform); with a
    per-channel shape one scale would either cut some channels or lift others above the cap, so
    the path from the conv to the pool stays in float (noted)."""
    by_name = {op.name: op for op in plan.ops}
    for op in plan.ops:
        if op.kind != "pool":
            continue
        e = plan.enc_of[op.inputs[0]]
        if not e.quantized:
            continue
        chain, name = [], op.inputs[0]
        while plan.enc_of.get(name) is e and by_name[name].kind in ("relu", "maxpool", "layer", "add"):
            chain.append(name)
            if by_name[name].kind in ("layer", "add"):
                break
            name = by_name[name].inputs[0]
        bound = _pre_pool_bound(plan, op, chain, by_name, report)
        uniform = bool((e.a == e.a[0]).all()) and bool((e.b == 0).all())
        params = (bound * float(e.a[0]) / QMAX, e.Z) if uniform and bound is not None and e.Z == 0 else None
        if params is None:
            plan.notes.append(f"{op.inputs[0]}: the tensor before the global pool has per-channel scales; the "
                              "path into the pool stays in float")
        for n in chain:
            plan.pre_pool[n] = params


def _pre_pool_bound(plan: Plan, pool: Op, chain: list[str], by_name: dict[str, Op],
                    report: QuantPlan | None) -> float | None:
    caps = [by_name[n].cap for n in chain if by_name[n].kind == "relu" and by_name[n].cap is not None]
    if caps:
        return min(float(torch.as_tensor(c).max()) for c in caps)
    readers = plan.enc_of[pool.name].targets   # the data-free analysis gives pooled tensors their input's law
    dist = report.propagation.inputs.get(readers[0]) if readers and report and report.propagation else None
    if dist is None:
        return None
    return float(clip_range(dist, 8, False).hi)


def node_quant(plan: Plan, name: str) -> tuple[float, int] | None:
    """The (S, Z) of the quantizer after this node (its domain's unless it feeds a global pool)."""
    e = plan.enc_of[name]
    if not e.quantized:
        return None
    if name in plan.pre_pool:
        return plan.pre_pool[name]
    return e.S, e.Z


def node_grid(plan: Plan, name: str) -> Grid:
    e = plan.enc_of[name]
    S, Z = node_quant(plan, name)
    return Grid(S / e.a, Z + e.b / S, e.grid.live.clone())


def cap_subsumed(plan: Plan, name: str, cap: float | torch.Tensor) -> bool:
    """Whether the quantizer after this ReLU6 saturates at or below the cap in every channel."""
    if node_quant(plan, name) is None:
        return False
    g, e = node_grid(plan, name), plan.enc_of[name]
    cap = torch.as_tensor(cap, dtype=g.hi.dtype).expand_as(g.hi)
    return bool((g.hi[g.live] <= cap[g.live] * (1 + 1e-6)).all()) and bool((e.b == 0).all())
