"""Torch models computing what an exported graph computes: the folded float twin, the simulation
of the int8 graph, and that simulation as the model `QuantConfig(int8_graph=True)` returns."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import fx, nn

from spiq.config import ConfigError
from spiq.core.quant import GridQuant, QuantLayer
from spiq.core.tensors import Range
from spiq.export.grids import QMAX
from spiq.export.onnx import build_export
from spiq.export.report import ExportReport
from spiq.export.support import ExportError
from spiq.graph.trace import LeafTracer
from spiq.quantize.api import register_int8_graph
from spiq.quantize.report import QuantPlan, QuantResult, module_of


def float_twin(qmodel: QuantResult | nn.Module, report: ExportReport, quantized: bool = False) -> nn.Module:
    """A torch copy of `qmodel` computing what the export wrote, in original units.

    quantized=False: no input quantizer, every layer with the weights and bias of the graph - what
    the folded float graph (export_onnx(..., quantized=False)) must equal. quantized=True: the
    simulation of the int8 graph's own layer grids (re-quantized layers included; the extra
    quantizers of the int8 kernels excluded)."""
    twin = copy.deepcopy(module_of(qmodel))
    for name, lp in report.plan.layers.items():
        mod = twin.get_submodule(name)
        if not isinstance(mod, QuantLayer):
            continue
        inner = mod.layer
        exact_int8 = quantized and lp.int8_bias is not None
        inner.weight.data = (lp.int8_weight if exact_int8 else lp.weight).float()
        if inner.bias is None:
            inner.bias = nn.Parameter(torch.zeros(lp.bias.numel()), requires_grad=False)
        inner.bias.data = (lp.int8_bias if exact_int8 else lp.bias).float()
        mod.input_quant = lp.input_quant if quantized else None
    return twin


def int8_simulation(qmodel: QuantResult | nn.Module, report: ExportReport) -> nn.Module:
    """A torch simulation of the int8 graph itself: `float_twin(..., quantized=True)` plus every
    quantizer the int8 kernels add (the residual branch before its add, the add's inputs, the
    tensor before the global pool). ONNX Runtime must agree with it but for rounding ties and
    accumulation order; the gap to the config's own simulation is the price of integer kernels."""
    if not report.quantized:
        raise ValueError("int8_simulation needs the int8 graph (export_onnx(..., quantized=True))")
    twin = float_twin(qmodel, report, quantized=True)
    gm = fx.GraphModule(twin, LeafTracer().trace(twin))
    nodes = {n.name: n for n in gm.graph.nodes}
    for k, (name, grid) in enumerate(report.plan.q_points.items()):
        node = nodes[name]
        gm.add_submodule(f"int8_quant_{k}", GridQuant(grid.step, grid.zero, QMAX))
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(f"int8_quant_{k}", (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    gm.recompile()
    return gm.eval()


def _report_with_graph_grids(source: QuantPlan, report: ExportReport) -> QuantPlan:
    """source's report, but each layer the int8 graph re-quantized gives the shared grid it reads,
    so what reads a layer's range (the per-layer breakdown's clipping) sees the twin's; source's
    own report is left as it was."""
    layers = dict(source.layers)
    for name in report.requantized:
        planned, old = report.plan.layers[name], source.layers[name]
        grid = planned.grid
        layers[name] = replace(
            old, input_bits=8, input_quant=planned.input_quant, range=Range(grid.lo.float(), grid.hi.float()),
            data_free_range_from=f"{old.data_free_range_from}; int8 graph: the residual stream's shared grid",
            reasons=old.reasons + ("re-quantized for the shared grid of the residual stream it reads",))
    return replace(source, layers=layers)


def int8_twin(qmodel: QuantResult, input_size: int | None = None) -> QuantResult:
    """`qmodel` as the int8 graph computes it (`int8_simulation` of the graph `export_onnx` would
    write), as a result of its own: what `quantize` returns for `QuantConfig(int8_graph=True)`.
    Its `source` is qmodel; exporting it writes qmodel's graph, which it simulates."""
    _, report = build_export(qmodel, "", True, input_size, None)
    twin = int8_simulation(qmodel, report)
    for p in twin.parameters():
        p.requires_grad_(False)
    return QuantResult(twin, _report_with_graph_grids(qmodel.report, report), qmodel.preprocess, source=qmodel)


def _int8_graph_for_quantize(qmodel: QuantResult) -> QuantResult:
    try:
        return int8_twin(qmodel)
    except ExportError as exc:
        raise ConfigError(f"int8_graph: {exc}") from None


register_int8_graph(_int8_graph_for_quantize)
