"""Real int8: a quantized model as an ONNX QDQ graph that ONNX Runtime runs on integer kernels.

Integer kernels take one activation scale per tensor (QLinearConv's x_scale is a scalar), so
SPIQ's per-channel input grids cannot be handed to them as they are. They are moved into the
graph instead. A tensor is carried in a transformed domain x'_c = a_c·x_c + b_c in which one
per-tensor QuantizeLinear (S, Z) gives exactly SPIQ's codes round(x_c / s_c) + z_c: a_c = S / s_c
and b_c = (z_c - Z)·S. The producing layer writes x' (its output rows scaled by a_c, its bias
shifted by b_c), the consuming layer reads it (its input columns divided by a_c, the shift
taken out through its bias), and the consumer's int8 weights are then SPIQ's own codes. Both
halves of the affine map are kept: a per-channel zero point is as much a part of SPIQ's grid as
its scale, and moving only the scale would widen every asymmetric channel's range.

Between two layers the map must commute with what sits there. It does with ReLU when b = 0
(post-ReLU grids start at 0, so z = 0), and with ReLU6 too when every channel's range ends at
or below the cap: the quantizer's saturation then does the cap's work. It does with pooling,
flattening and max-pooling. Where it cannot be exact the export does the closest honest thing
and reports it (`ExportReport`):

- a residual stream: an add of two transformed tensors only makes sense in one domain, so
  every tensor joined by adds shares one vector a, while SPIQ chose a grid per consumer. Each
  tensor keeps its own per-tensor scale and its own per-channel zero points, the shared
  per-channel shape is the least-squares fit (in log steps) to SPIQ's steps, ranges stay
  centred where SPIQ put them, and the layers reading those tensors are re-quantized by SPIQ's
  own recipe for the step they actually get (folded weights, SQuant rounding, bias correction)
  - `requantized`;
- the int8 graph quantizes tensors that the simulation keeps in float: a residual branch before
  its add (on the sum's step, centred by the zero points the add implies), the last conv's
  output before the global pool (on the pooled tensor's grid) - `extra_quantizers`;
- an op that does not commute with a per-channel scale (SiLU, Hardswish, GELU...) is followed
  by an explicit per-channel Mul/Add before a per-tensor QuantizeLinear - `mul_layers`. It costs
  15-17 % per conv and keeps the producing conv in float, so it is used only there;
- zero padding inserts x' = 0, which is x = 0 only where b = 0: a padded layer behind a
  per-channel Mul gets an explicit Pad before it; one reading a conv output gets one zero point.

Activations are uint8 with 8-bit grids: ONNX Runtime's integer kernels take uint8 (or int8)
activations and saturate at the container's ends, so a 4-bit grid's clipping has no kernel.
Weights are int8 codes (any width up to 8 bits) with one scale per output channel; biases are
int32 on the accumulator's unit, as QLinearConv requires (a shift of up to half a unit, which
`int8_simulation` models and the float simulation does not).

The int8 graph is exactly a simulated network (`int8_simulation`), but a quantized network's
rounding is chaotic: one code flipped by a last-bit difference flips more codes in the next
layer. On EfficientNet-Lite0 the simulation disagrees with itself run at another batch size
(float summation order) on 0.5 % of top-1s, and ONNX Runtime's exact integer sums, against
float32 convolutions, on about 2 %: top-1 parity with a float simulation has that floor.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from spiq.export.runtime import ort_session
from spiq.config import CALIBRATED, DATA_FREE, TRANSFORMER_ONLY, ConfigError
from spiq.transforms.fold import ChannelReLU6
from spiq.graph.trace import LeafTracer
from spiq.core.quant import GridQuant, InputQuant, QuantLayer, fake_quant_input
from spiq.core.metrics import sqnr_db
from spiq.core.tensors import Range, broadcast_input, per_input_channel
from spiq.quantize.api import register_int8_graph
from spiq.ranges.laws import unknown_input_dist

if TYPE_CHECKING:   # quantize imports this module when a config asks for the int8 graph
    from spiq.quantize.api import QuantReport

OPSET = 17
IR_VERSION = 8            # the IR that goes with opset 17: readable by every ONNX Runtime since 1.13
QMAX = 255                # uint8 activations
_DEAD = 1e-6              # a channel whose step is this small against the widest is dead (its range is {0})


class ExportError(ValueError):
    """The model or its quantization has no int8 ONNX form. Nothing was written."""


# --- the graph, as ops the export knows ----------------------------------------------------------

_SUPPORTED = ("Conv2d, Linear, ReLU, ReLU6, SiLU, Hardswish, GELU, Sigmoid, Tanh, Hardsigmoid, residual add, "
              "global average pool, max pool, flatten, Identity/Dropout")
_FLOAT_ACTS = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
               nn.Hardsigmoid: "hardsigmoid"}
_FN_ACTS = {F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
            torch.tanh: "tanh", F.hardsigmoid: "hardsigmoid", "sigmoid": "sigmoid", "tanh": "tanh"}
_FN_RELU = {F.relu: None, torch.relu: None, "relu": None, F.relu6: 6.0}
_ADDS = {"add", "add_", "iadd"}


@dataclass
class _Op:
    """One fx node as the export sees it; `name` is also its ONNX value name."""
    name: str
    kind: str                   # input | layer | relu | act | pool | maxpool | flatten | add | output
    inputs: list[str]
    shape: tuple = ()
    module: nn.Module | None = None
    target: str = ""            # the model's name of a layer
    cap: float | torch.Tensor | None = None    # ReLU6; per channel after cross-layer equalization
    act: str = ""               # a float activation's name

    @property
    def channels(self) -> int:
        return int(self.shape[1])


def _fn_name(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))


def _unsupported(node: fx.Node, what: str) -> ExportError:
    return ExportError(f"cannot export {what} (fx node `{node.name}`): not supported by the int8 export "
                       f"(supported: {_SUPPORTED})")


def _trace(model: nn.Module, input_shape: tuple[int, int, int]) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.GraphModule(model, LeafTracer().trace(model))
    except Exception as exc:
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    return gm


def _shape(node: fx.Node) -> tuple:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _is_global_pool(shape_in: tuple, shape_out: tuple) -> bool:
    return len(shape_in) == 4 and (shape_out[2:] == (1, 1) or len(shape_out) == 2)


def _graph_ops(gm: fx.GraphModule) -> list[_Op]:
    """The model's fx graph as export ops; pass-through nodes are resolved to their source."""
    ops: list[_Op] = []
    alias: dict[str, str] = {}

    def src(a) -> str:
        if not isinstance(a, fx.Node):
            raise ExportError(f"cannot export: expected a tensor argument, got {a!r}")
        return alias.get(a.name, a.name)

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            ops.append(_Op(node.name, "input", [], shape))
        elif node.op == "output":
            ops.append(_Op(node.name, "output", [src(node.args[0])]))
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            shape_in = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else ()
            inner = mod.layer if isinstance(mod, QuantLayer) else mod
            if isinstance(inner, (nn.Conv2d, nn.Linear)):
                if isinstance(inner, nn.Conv2d) and inner.padding_mode != "zeros":
                    raise _unsupported(node, f"module `{node.target}` (Conv2d with padding_mode={inner.padding_mode!r})")
                ops.append(_Op(node.name, "layer", [src(node.args[0])], shape, mod, node.target))
            elif isinstance(mod, (nn.Identity, nn.Dropout)) or (isinstance(mod, nn.Flatten) and shape == shape_in):
                alias[node.name] = src(node.args[0])
            elif isinstance(mod, nn.Flatten) and len(shape) == 2 and shape_in[2:] in ((1, 1), ()):
                ops.append(_Op(node.name, "flatten", [src(node.args[0])], shape))
            elif type(mod) in (nn.ReLU, nn.ReLU6):
                ops.append(_Op(node.name, "relu", [src(node.args[0])], shape, cap=6.0 if type(mod) is nn.ReLU6 else None))
            elif isinstance(mod, ChannelReLU6):
                ops.append(_Op(node.name, "relu", [src(node.args[0])], shape, cap=mod.cap.double()))
            elif type(mod) in _FLOAT_ACTS and getattr(mod, "approximate", "none") == "none":
                ops.append(_Op(node.name, "act", [src(node.args[0])], shape, act=_FLOAT_ACTS[type(mod)]))
            elif isinstance(mod, nn.AdaptiveAvgPool2d) and _is_global_pool(shape_in, shape):
                ops.append(_Op(node.name, "pool", [src(node.args[0])], shape))
            elif type(mod).__name__ == "SelectAdaptivePool2d" and mod.pool_type in ("avg", "fast", "fastavg") \
                    and _is_global_pool(shape_in, shape):
                ops.append(_Op(node.name, "pool", [src(node.args[0])], shape))
            elif isinstance(mod, nn.MaxPool2d) and not mod.ceil_mode and mod.dilation in (1, (1, 1)):
                ops.append(_Op(node.name, "maxpool", [src(node.args[0])], shape, mod))
            else:
                raise _unsupported(node, f"module `{node.target}` ({type(mod).__name__})")
        elif node.op in ("call_function", "call_method"):
            fn, name = node.target, _fn_name(node.target)
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if (fn in (torch.add,) or name in _ADDS) and len(tensors) == 2 and len(node.args) == 2 \
                    and _shape(tensors[0]) == _shape(tensors[1]) == shape:
                ops.append(_Op(node.name, "add", [src(tensors[0]), src(tensors[1])], shape))
            elif fn in _FN_RELU and len(tensors) == 1:
                ops.append(_Op(node.name, "relu", [src(tensors[0])], shape, cap=_FN_RELU[fn]))
            elif fn in _FN_ACTS and len(tensors) == 1 and node.kwargs.get("approximate", "none") == "none":
                ops.append(_Op(node.name, "act", [src(tensors[0])], shape, act=_FN_ACTS[fn]))
            elif name in ("contiguous", "clone", "dropout") and len(tensors) == 1:
                alias[node.name] = src(tensors[0])
            elif name in ("flatten", "view", "reshape") and len(tensors) == 1 and len(shape) == 2 \
                    and _shape(tensors[0])[2:] in ((1, 1), ()):
                if _shape(tensors[0]) == shape:
                    alias[node.name] = src(tensors[0])
                else:
                    ops.append(_Op(node.name, "flatten", [src(tensors[0])], shape))
            elif (fn is F.adaptive_avg_pool2d or name == "mean") and len(tensors) == 1 \
                    and _is_global_pool(_shape(tensors[0]), shape) and _pools_spatially(node):
                ops.append(_Op(node.name, "pool", [src(tensors[0])], shape))
            else:
                raise _unsupported(node, f"op `{name}`")
        else:
            raise _unsupported(node, f"`{node.op}` node")
    return ops


def _pools_spatially(node: fx.Node) -> bool:
    if _fn_name(node.target) != "mean":
        return node.args[1] in (1, (1, 1)) if len(node.args) > 1 else node.kwargs.get("output_size") in (1, (1, 1))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return tuple(sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))) == (2, 3)


# --- SPIQ's grids and the domains that carry them ---------------------------------------------

@dataclass
class _Grid:
    """A per-channel uint8 grid: x ≈ (code - zero)·step, codes 0..255. Dead channels (range {0},
    their weights all zero) get a neutral step and take no part in any fit."""
    step: torch.Tensor          # (C,) float64
    zero: torch.Tensor          # (C,) float64, integers
    live: torch.Tensor          # (C,) bool

    @property
    def lo(self):
        return -self.zero * self.step

    @property
    def hi(self):
        return (QMAX - self.zero) * self.step


def _per_channel(v: torch.Tensor, channels: int) -> torch.Tensor:
    v = v.detach().double().reshape(-1)
    return v.expand(channels).clone() if v.numel() == 1 else v.clone()


def _input_columns_zero(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Per input channel: True where every weight reading it is zero."""
    return per_input_channel(codes.abs().double(), groups) == 0


def _spiq_grid(ql: QuantLayer, channels: int) -> _Grid:
    q = ql.input_quant
    step, zero = _per_channel(q.scale, channels), _per_channel(q.zero, channels)
    dead = (step < _DEAD * step.max()) & _input_columns_zero(ql.weight_codes, getattr(ql.layer, "groups", 1))
    live = ~dead
    if dead.any():
        step[dead] = step[live].median() if live.any() else 1.0
        zero[dead] = 0.0
    return _Grid(step, zero, live)


def _same_grid(g: _Grid, h: _Grid) -> bool:
    m = g.live & h.live
    return bool(torch.equal(g.live, h.live) and torch.allclose(g.step[m], h.step[m], rtol=1e-6, atol=0)
                and torch.equal(g.zero[m], h.zero[m]))


@dataclass
class _Enc:
    """Tensors that share one transformed domain x' = a·x + b and one per-tensor quantizer (S, Z).

    A layer, an add, an activation or the graph input creates one; ReLU, pooling and flattening
    leave their input's. `fixed` domains stay in the original units (a = 1, b = 0): the graph
    input, the output, and both sides of an op that does not commute with a per-channel scale."""
    id: int
    root: _Op
    channels: int
    fixed: bool = False
    relu: bool = False                       # a ReLU reads it: b must be 0
    padded: bool = False                     # a padded layer reads it: b must be 0
    targets: list[str] = field(default_factory=list)   # int8 layers reading it
    group: int = -1
    convert_for: str = ""                    # an explicit Mul/Add domain made for this one layer
    # decided by the plan
    a: torch.Tensor | None = None            # (C,)
    b: torch.Tensor | None = None            # (C,), in transformed units
    S: float = 1.0
    Z: int = 0
    quantized: bool = False
    grid: _Grid | None = None                # the effective grid (original units) when quantized
    unified: bool = False                    # per-channel zero points were made one (padding)

    def identity(self) -> None:
        self.a = torch.ones(self.channels, dtype=torch.float64)
        self.b = torch.zeros(self.channels, dtype=torch.float64)


@dataclass
class _LayerPlan:
    """What one conv/linear computes, in original units: y = Σ weight·x̂ + bias, where x̂ is the
    input on `grid` (int8 layers: weight = codes·wscale / step, per output and input channel)."""
    name: str
    op: _Op
    int8: bool
    weight: torch.Tensor                      # float64, original domain
    bias: torch.Tensor                        # float64 (O,)
    codes: torch.Tensor | None = None         # integer-valued
    wscale: torch.Tensor | None = None        # (O,) float64: codes·wscale = weight · step (per input channel)
    grid: _Grid | None = None
    spiq_grid: _Grid | None = None
    requantized: bool = False
    input_quant: InputQuant | None = None     # for the torch twin
    # what the int8 graph really holds, in original units: the bias rounded to the int32
    # accumulator unit, the weights without the filters kept as their bias only
    int8_weight: torch.Tensor | None = None
    int8_bias: torch.Tensor | None = None
    enc_in: _Enc | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    explicit_pad: bool = False                # padded by a Pad op in front (original units)


@dataclass
class _Plan:
    ops: list[_Op]
    encs: list[_Enc]
    enc_of: dict[str, _Enc]
    layers: dict[str, _LayerPlan]
    users: dict[str, list[str]]
    input_shape: tuple[int, int, int]
    notes: list[str]
    probes: dict[str, str] = field(default_factory=dict)   # int8 layer -> the QuantizeLinear output it reads
    q_points: dict[str, _Grid] = field(default_factory=dict)   # fx node -> the grid of the quantizer after it
    # nodes before a global pool, in their domain: their own per-tensor (S, Z), or None: float
    pre_pool: dict[str, tuple[float, int] | None] = field(default_factory=dict)
    dropped: dict[str, tuple[int, float]] = field(default_factory=dict)   # layer -> (filters, bound) kept as bias


def _pads(op: _Op, shape_in: tuple) -> tuple[int, int, int, int]:
    m = op.module.layer if isinstance(op.module, QuantLayer) else op.module
    if not isinstance(m, nn.Conv2d):
        return 0, 0, 0, 0
    if type(m).__name__ == "Conv2dSame":   # timm's TF "same": computed per input size; static here
        from timm.layers.padding import get_same_padding

        ph = get_same_padding(shape_in[2], m.kernel_size[0], m.stride[0], m.dilation[0])
        pw = get_same_padding(shape_in[3], m.kernel_size[1], m.stride[1], m.dilation[1])
        return ph // 2, pw // 2, ph - ph // 2, pw - pw // 2
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return 0, 0, 0, 0
        tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2
    ph, pw = m.padding
    return ph, pw, ph, pw


def _layer_plan(op: _Op, shape_in: tuple) -> _LayerPlan:
    mod = op.module
    inner = mod.layer if isinstance(mod, QuantLayer) else mod
    bias = inner.bias.detach().double() if inner.bias is not None else torch.zeros(inner.weight.shape[0], dtype=torch.float64)
    plan = _LayerPlan(op.target, op, False, inner.weight.detach().double(), bias.clone(), pads=_pads(op, shape_in))
    if not isinstance(mod, QuantLayer) or mod.input_quant is None:
        return plan
    q = mod.input_quant
    if q.mode != "static":
        raise ExportError(f"layer {op.target}: {q.mode} input quantization has no static int8 graph; "
                          "export a static method (spiq, static-tensor, calib-*)")
    if q.bits != 8:
        raise ExportError(f"layer {op.target}: {q.bits}-bit inputs; the int8 export needs 8-bit inputs "
                          "(ONNX Runtime's integer kernels take uint8 activations and saturate at 255, so a "
                          f"{q.bits}-bit grid's clipping has no kernel)")
    if float(mod.weight_codes.abs().max()) > 127:
        raise ExportError(f"layer {op.target}: weight codes exceed int8 (more than 8-bit weights)")
    channels = shape_in[1]
    grid = _spiq_grid(mod, channels)
    out = inner.weight.shape[0]
    ws = _per_channel(mod.weight_scale, out)
    # codes·wscale is the weight times the input step: folded layers hold exactly that; a
    # per-tensor input multiplies its one step in.
    wscale = ws if mod.folded else ws * grid.step[0]
    check = mod.weight_codes.double() * _out_view(wscale, inner.weight)
    expect = plan.weight * broadcast_input(grid.step, plan.weight, getattr(inner, "groups", 1))
    if not torch.allclose(check, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max())):
        raise ExportError(f"layer {op.target}: its weights are not its integer codes times its scales")
    plan.int8, plan.codes, plan.wscale, plan.grid, plan.spiq_grid = True, mod.weight_codes.double(), wscale, grid, grid
    plan.input_quant = q
    return plan


def _out_view(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (w.dim() - 1))


def _requantize(qmodel: nn.Module, lp: _LayerPlan, grid: _Grid) -> None:
    """Quantize layer `lp` again, by the recipe quantize() used, for the input grid it really gets."""
    from spiq.quantize.api import bias_shift, plan_layer
    from spiq.ranges.laws import law_moments, range_effect

    report, config = getattr(qmodel, "spiq_report", None), getattr(qmodel, "spiq_config", None)
    reference = report.reference if report is not None and report.prepared is not None else None
    if reference is None or config is None:
        raise ExportError(f"layer {lp.name}: its input grid must change for the int8 graph and the model "
                          "carries no float reference to re-quantize it from (quantize it with spiq.quantize)")
    s = config.for_layer(lp.name)
    ref = reference.get_submodule(lp.name)
    rng = Range(grid.lo.float(), grid.hi.float())
    inq, codes, w_scale, w_sim = plan_layer(ref, rng, 8, True, s.weight_bits, s.weight_per_channel, config)
    bias = ref.bias.detach().clone() if ref.bias is not None else torch.zeros(w_sim.shape[0])
    if config.bias_correction:
        dist = report.propagation.inputs.get(lp.name) if report.propagation is not None else None
        dist = dist or unknown_input_dist(grid.step.numel(), config.tail)
        bias = bias - bias_shift(ref, ref.weight.detach(), w_sim, law_moments(dist)[0], range_effect(dist, rng, 8).mean_q)
    if report is not None and lp.name in report.bias_fit:
        # what bias_images fitted is mostly the mean error the layers before left, which does not
        # depend on the grid this layer reads
        bias = bias - report.bias_fit[lp.name]
    step, zero = _per_channel(inq.scale, grid.step.numel()), _per_channel(inq.zero, grid.step.numel())
    lp.grid = _Grid(step, zero, grid.live.clone())
    lp.codes, lp.wscale = codes.double(), _per_channel(w_scale, w_sim.shape[0])
    lp.weight, lp.bias = w_sim.double(), bias.double()
    lp.input_quant, lp.requantized = inq, True


# --- the plan: domains, grids, layers ------------------------------------------------------------

def _build_encs(ops: list[_Op], users: dict[str, list[str]], layers: dict[str, _LayerPlan]) -> tuple[list[_Enc], dict[str, _Enc]]:
    encs: list[_Enc] = []
    enc_of: dict[str, _Enc] = {}
    by_name = {op.name: op for op in ops}

    def new(op: _Op, fixed=False) -> _Enc:
        e = _Enc(len(encs), op, op.channels, fixed=fixed)
        encs.append(e)
        enc_of[op.name] = e
        return e

    for op in ops:
        if op.kind in ("input", "layer", "add"):
            new(op, fixed=op.kind == "input")
        elif op.kind == "act":
            enc_of[op.inputs[0]].fixed = True
            new(op, fixed=True)
        elif op.kind in ("relu", "pool", "maxpool", "flatten"):
            e = enc_of[op.inputs[0]]
            if op.kind == "relu":
                others = [u for u in users[op.inputs[0]] if u != op.name]
                if others and by_name[op.inputs[0]].kind != "relu":
                    raise ExportError(f"cannot export: the pre-activation tensor `{op.inputs[0]}` feeds `{op.name}` "
                                      f"and also {', '.join(others)}; the int8 graph quantizes only after the "
                                      "activation")
                e.relu = True
            enc_of[op.name] = e
        elif op.kind == "output":
            enc_of[op.inputs[0]].fixed = True
    # adds join domains into groups (one shared a); a fixed member fixes the group
    parent = list(range(len(encs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for op in ops:
        if op.kind == "add":
            for x in op.inputs:
                parent[find(enc_of[x].id)] = find(enc_of[op.name].id)
    fixed_groups = {find(e.id) for e in encs if e.fixed}
    for e in encs:
        e.group = find(e.id)
        e.fixed = e.group in fixed_groups
    for name, lp in layers.items():
        e = enc_of[lp.op.inputs[0]]
        if any(lp.pads):
            e.padded = True
        if lp.int8 and not e.fixed:
            e.targets.append(name)
    return encs, enc_of


def _needed(e: _Enc, layers: dict[str, _LayerPlan]) -> tuple[_Grid, bool]:
    """The grid a domain's readers want: theirs if they agree, else one covering all their ranges."""
    grids = [layers[t].spiq_grid for t in e.targets]
    g0 = grids[0]
    same = all(_same_grid(g0, g) for g in grids[1:])
    if same:
        grid = _Grid(g0.step.clone(), g0.zero.clone(), g0.live.clone())
    else:
        live = torch.stack([g.live for g in grids]).any(0)
        lo = torch.stack([torch.where(g.live, g.lo, 0.0) for g in grids]).min(0).values
        hi = torch.stack([torch.where(g.live, g.hi, 0.0) for g in grids]).max(0).values
        step = ((hi - lo) / QMAX).clamp_min(1e-30)
        grid = _Grid(step, torch.round(-lo / step).clamp(0, QMAX), live)
        _neutral_dead(grid)
    if (e.relu or e.padded) and bool((grid.zero[grid.live] != grid.zero[grid.live][0]).any()):
        # b must be 0: one zero point for all channels, each step the smallest that still covers
        # the channel's range on that zero point
        lo, hi = grid.lo, grid.hi
        z = float(torch.round(QMAX * (-lo / (hi - lo))[grid.live].median()).clamp(1, QMAX - 1))
        step = torch.maximum(-lo / z, hi / (QMAX - z))
        grid = _Grid(step, torch.full_like(step, z), grid.live)
        e.unified = True
        same = False
    return grid, same


def _neutral_dead(g: _Grid) -> None:
    if (~g.live).any():
        g.step[~g.live] = g.step[g.live].median() if g.live.any() else 1.0
        g.zero[~g.live] = 0.0


def _fit_shared(needs: list[torch.Tensor], lives: list[torch.Tensor], cover: bool) -> tuple[torch.Tensor, list[float]]:
    """One per-channel shape σ and per-tensor scales S_T with S_T·σ_c close to the step_Tc wanted.

    In log space, u_c + v_T ≈ log step_Tc (a row and a column effect), by alternating the two
    closed-form minima from the geometric mean. One tensor, or proportional steps, fit exactly.
    cover=False: least squares, each step off by the same factor either way at worst. SPIQ's
    data-free ranges of a residual stream are bounds far wider than its values: a range a few
    percent narrower clips nothing, and on EfficientNet-Lite0 W8A8 this put the int8 model
    1.4 dB closer to the float one (logits SQNR) than covering did. cover=True: no step below
    the one wanted (each the max the constraints allow), for calibrated ranges, which are the
    data's own extent and lose a lot when narrowed.
    """
    L = torch.stack([n.log() for n in needs])
    live = torch.stack(lives)
    any_live = live.any(0)
    w = live.double()
    u = torch.where(any_live, (L * w).sum(0) / w.sum(0).clamp_min(1), 0.0)
    neg = torch.tensor(-math.inf, dtype=torch.float64)
    for _ in range(50):
        if cover:
            v = torch.where(live, L - u, neg).max(1).values
            u_new = torch.where(any_live, torch.where(live, L - v[:, None], neg).max(0).values, u)
        else:
            v = ((L - u) * w).sum(1) / w.sum(1).clamp_min(1)
            u_new = torch.where(any_live, ((L - v[:, None]) * w).sum(0) / w.sum(0).clamp_min(1), u)
        done = torch.allclose(u_new, u, rtol=0, atol=1e-12)
        u = u_new
        if done:
            break
    v = (torch.where(live, L - u, neg).max(1).values if cover
         else ((L - u) * w).sum(1) / w.sum(1).clamp_min(1))
    if not any_live.all():
        u[~any_live] = u[any_live].median() if any_live.any() else 0.0
    shift = u[any_live].max() if any_live.any() else u.max()
    sigma = (u - shift).exp()
    return sigma, [float(math.exp(x + shift)) for x in v]


def _solve_group(members: list[_Enc], layers: dict[str, _LayerPlan], qmodel: nn.Module, adds: list[_Op],
                 enc_of: dict[str, _Enc], order: dict[int, int]) -> None:
    targeted = [e for e in members if e.targets]
    if not targeted:
        for e in members:
            e.identity()
        return
    needs = [_needed(e, layers) for e in targeted]
    config = getattr(qmodel, "spiq_config", None)
    calibrated = config is None or any(config.for_layer(t).method in CALIBRATED for e in targeted for t in e.targets)
    sigma, scales = _fit_shared([g.step for g, _ in needs], [g.live for g, _ in needs], cover=calibrated)
    a = 1.0 / sigma
    for e, (g, same), S in zip(targeted, needs, scales):
        e.a, e.S, e.quantized = a, S, True
        step = S * sigma
        exact = same and bool(torch.allclose(step[g.live], g.step[g.live], rtol=1e-6, atol=0))
        if exact:
            e.grid = g
        else:
            # where b must be 0 the zero point stays the one all channels share, and the wider
            # steps still cover the range on it
            zero = (torch.full_like(step, g.zero[g.live][0].item()) if e.relu or e.padded
                    else torch.round(QMAX / 2 - (g.lo + g.hi) / (2 * step)).clamp(0, QMAX))
            e.grid = _Grid(step, zero, g.live)
            e.grid.zero[~g.live] = 0.0
        e.Z = int(e.grid.zero[e.grid.live].median()) if e.grid.live.any() else 0
        if e.relu or e.padded:
            e.Z = int(e.grid.zero[e.grid.live][0]) if e.grid.live.any() else 0
            e.grid.zero[~e.grid.live] = e.Z
        e.b = (e.grid.zero - e.Z) * S
    for e in members:
        if e.a is None:
            e.a = a
        for t in e.targets:
            if not _same_grid(layers[t].spiq_grid, e.grid):
                _requantize(qmodel, layers[t], e.grid)
    _solve_shifts(members, adds, enc_of, order)


def _solve_shifts(members: list[_Enc], adds: list[_Op], enc_of: dict[str, _Enc], order: dict[int, int]) -> None:
    """Per-channel shifts b of the untargeted domains: an add's output shift is its inputs' sum.

    Then the untargeted domains that int8 kernels need quantized (a residual branch before its
    add, an add's output) borrow the per-tensor scale of the domain they are added into (or of
    their widest addend), with the zero point that centres their channels where that domain's
    are."""
    ids = {e.id for e in members}
    eqs = [(enc_of[op.name], enc_of[op.inputs[0]], enc_of[op.inputs[1]]) for op in adds if enc_of[op.name].id in ids]
    known = {e.id for e in members if e.b is not None}
    for e in members:
        if e.b is None and e.relu:
            e.b = torch.zeros(e.channels, dtype=torch.float64)
            known.add(e.id)
    while True:
        progress = False
        for y, p, q in eqs:
            unknown = [x for x in (y, p, q) if x.id not in known]
            if len(unknown) == 1:
                x = unknown[0]
                x.b = p.b + q.b if x is y else y.b - (q.b if x is p else p.b)
                known.add(x.id)
                progress = True
            elif not unknown and not torch.allclose(y.b, p.b + q.b, atol=1e-9 * float(y.S)):
                raise ExportError(f"cannot export the residual add `{y.root.name}`: its output and both inputs feed "
                                  "int8 layers whose per-channel zero points cannot be made consistent")
        if progress:
            continue
        free = [e for e in members if e.id not in known and e.root.kind == "layer"]
        if not free:
            break
        free[0].b = torch.zeros(free[0].channels, dtype=torch.float64)
        known.add(free[0].id)
    for e in members:
        if e.b is None:
            e.b = torch.zeros(e.channels, dtype=torch.float64)
    # quantizers the int8 kernels need and the simulation does not have
    for e in sorted(members, key=lambda e: order[e.id]):
        if e.quantized or e.root.kind not in ("layer", "add"):
            continue
        if e.root.kind == "layer" and not isinstance(e.root.module, QuantLayer):
            continue
        if e.root.kind == "add" and not all(enc_of[x].quantized for x in e.root.inputs):
            continue
        ref = _reference_domain(e, eqs)
        if ref is None:
            continue
        e.S = ref.S
        shift = e.b / e.S
        e.Z = int(torch.round((ref.grid.zero - shift)[ref.grid.live].median()).clamp(0, QMAX))
        e.grid = _Grid(e.S / e.a, e.Z + shift, ref.grid.live.clone())
        e.quantized = True


def _reference_domain(e: _Enc, eqs) -> _Enc | None:
    for y, p, q in eqs:
        if e is p or e is q:
            if y.quantized:
                return y
    for y, p, q in eqs:
        if e is y and p.quantized and q.quantized:
            return p if p.S >= q.S else q
    return None


def _conversion(lp: _LayerPlan, src: _Enc, encs: list[_Enc]) -> _Enc:
    """An explicit per-channel Mul/Add domain in front of one layer reading a fixed domain."""
    g = lp.grid
    e = _Enc(len(encs), lp.op, g.step.numel(), convert_for=lp.name, targets=[lp.name])
    encs.append(e)
    e.S = float(g.step[g.live].max()) if g.live.any() else 1.0
    e.a = e.S / g.step
    e.Z = int(g.zero[g.live].median()) if g.live.any() else 0
    e.b = (g.zero - e.Z) * e.S
    e.grid, e.quantized = g, True
    e.group = -1
    if any(lp.pads) and bool((e.b != 0).any()):
        lp.explicit_pad = True   # pad in original units, before the shift: x = 0 is code z_c there
    return e


def _plan_export(model: nn.Module, input_shape: tuple[int, int, int]) -> _Plan:
    gm = _trace(model, input_shape)
    ops = _graph_ops(gm)
    by_name = {op.name: op for op in ops}
    users: dict[str, list[str]] = {op.name: [] for op in ops}
    for op in ops:
        for x in op.inputs:
            users[x].append(op.name)
    layers = {op.target: _layer_plan(op, by_name[op.inputs[0]].shape) for op in ops if op.kind == "layer"}
    out_src = by_name[[op for op in ops if op.kind == "output"][0].inputs[0]]
    if len(out_src.shape) != 2:
        raise ExportError(f"cannot export: the model's output `{out_src.name}` is not (batch, classes) logits")
    encs, enc_of = _build_encs(ops, users, layers)
    order = {e.id: i for i, e in enumerate(encs)}
    adds = [op for op in ops if op.kind == "add"]
    groups: dict[int, list[_Enc]] = {}
    for e in encs:
        groups.setdefault(e.group, []).append(e)
    for members in groups.values():
        if members[0].fixed:
            for e in members:
                e.identity()
        else:
            _solve_group(members, layers, model, adds, enc_of, order)
    notes: list[str] = []
    for lp in layers.values():
        src = enc_of[lp.op.inputs[0]]
        lp.enc_in = _conversion(lp, src, encs) if lp.int8 and src.fixed else src
    plan = _Plan(ops, encs, enc_of, layers, users, input_shape, notes)
    _plan_pre_pool(plan, model)
    for op in ops:
        if op.kind == "relu" and op.cap is not None and _node_quant(plan, op.name) is not None \
                and not _cap_subsumed(plan, op.name, op.cap):
            notes.append(f"{op.name}: some channel's range reaches above the ReLU6 cap, so the cap stays an "
                         "explicit op (not fused)")
    return plan


def _plan_pre_pool(plan: _Plan, model: nn.Module) -> None:
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
        bound = _pre_pool_bound(plan, op, chain, by_name, model)
        uniform = bool((e.a == e.a[0]).all()) and bool((e.b == 0).all())
        params = (bound * float(e.a[0]) / QMAX, e.Z) if uniform and bound is not None and e.Z == 0 else None
        if params is None:
            plan.notes.append(f"{op.inputs[0]}: the tensor before the global pool has per-channel scales; the "
                              "path into the pool stays in float")
        for n in chain:
            plan.pre_pool[n] = params


def _pre_pool_bound(plan: _Plan, pool: _Op, chain: list[str], by_name: dict[str, _Op], model: nn.Module) -> float | None:
    caps = [by_name[n].cap for n in chain if by_name[n].kind == "relu" and by_name[n].cap is not None]
    if caps:
        return min(float(torch.as_tensor(c).max()) for c in caps)
    report = getattr(model, "spiq_report", None)
    readers = plan.enc_of[pool.name].targets   # the data-free analysis gives pooled tensors their input's law
    dist = report.propagation.inputs.get(readers[0]) if readers and report and report.propagation else None
    if dist is None:
        return None
    from spiq.ranges.laws import clip_range

    return float(clip_range(dist, 8, False).hi)


def _node_quant(plan: _Plan, name: str) -> tuple[float, int] | None:
    """The (S, Z) of the quantizer after this node (its domain's unless it feeds a global pool)."""
    e = plan.enc_of[name]
    if not e.quantized:
        return None
    if name in plan.pre_pool:
        return plan.pre_pool[name]
    return e.S, e.Z


def _node_grid(plan: _Plan, name: str) -> _Grid:
    e = plan.enc_of[name]
    S, Z = _node_quant(plan, name)
    return _Grid(S / e.a, Z + e.b / S, e.grid.live.clone())


def _cap_subsumed(plan: _Plan, name: str, cap: float | torch.Tensor) -> bool:
    """Whether the quantizer after this ReLU6 saturates at or below the cap in every channel."""
    if _node_quant(plan, name) is None:
        return False
    g, e = _node_grid(plan, name), plan.enc_of[name]
    cap = torch.as_tensor(cap, dtype=g.hi.dtype).expand_as(g.hi)
    return bool((g.hi[g.live] <= cap[g.live] * (1 + 1e-6)).all()) and bool((e.b == 0).all())


# --- ONNX emission --------------------------------------------------------------------------------

class _Builder:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], Counter()

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        arr = np.asarray(arr)   # 0-d stays 0-d: a per-tensor quantizer's scale is a scalar
        self.inits.append(numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def fresh(self, base: str) -> str:
        self._n[base] += 1
        return f"{base}_{self._n[base]}"


def _vec(v: torch.Tensor, ndim: int) -> np.ndarray:
    shape = (1, -1) + (1,) * (ndim - 2)
    return v.detach().double().numpy().astype(np.float32).reshape(shape)


def _build_onnx(plan: _Plan, quantized: bool, batch: int | None, name: str):
    from onnx import TensorProto, helper

    b = _Builder()
    val: dict[str, str] = {}                 # node -> float value (transformed domain)
    qval: dict[str, tuple[str, str, str]] = {}   # node -> (Q output, scale, zero) where a quantizer sits
    enc_of, users, by_name = plan.enc_of, plan.users, {op.name: op for op in plan.ops}
    extra: list[str] = []
    probes: dict[str, str] = {}              # layer -> the Q output it reads
    q_points: dict[str, _Grid] = {}

    def add_q(node_name: str, key: str) -> None:
        S, Z = _node_quant(plan, key)
        s = b.const(f"{node_name}_scale", np.array(S, np.float32))
        z = b.const(f"{node_name}_zero", np.array(Z, np.uint8))
        qval[node_name] = (b.node("QuantizeLinear", [val[node_name], s, z], f"{node_name}_q"), s, z)

    def read(node_name: str, int8: bool) -> str:
        """The value a consumer reads: a dedicated DequantizeLinear of the quantizer, or the float value."""
        if int8 and node_name in qval:
            q, s, z = qval[node_name]
            return b.node("DequantizeLinear", [q, s, z], b.fresh(f"{node_name}_dq"))
        return val[node_name]

    def needs_q(node_name: str) -> bool:
        if not quantized or _node_quant(plan, node_name) is None:
            return False
        us = users[node_name]
        return bool(us) and not all(by_name[u].kind == "relu" for u in us)

    in_dims = [batch if batch else "N", *plan.input_shape]
    for op in plan.ops:
        if op.kind == "input":
            val[op.name] = "input"
        elif op.kind == "output":
            b.node("Identity", [val[op.inputs[0]]], "logits")
            continue
        elif op.kind == "layer":
            _emit_layer(b, plan, plan.layers[op.target], val, qval, read, quantized, probes)
        elif op.kind == "relu":
            e = enc_of[op.name]
            x = val[op.inputs[0]]
            if op.cap is None or (quantized and _cap_subsumed(plan, op.name, op.cap)):
                x = b.node("Relu", [x], op.name)
            else:
                cap = e.a * op.cap + e.b
                if bool((cap == cap[0]).all()):   # one cap: a Clip, which quantizers know
                    x = b.node("Clip", [x, b.const(f"{op.name}_lo", np.array(0.0, np.float32)),
                                        b.const(f"{op.name}_hi", np.array(float(cap[0]), np.float32))], op.name)
                else:
                    x = b.node("Min", [b.node("Relu", [x], f"{op.name}_relu"),
                                       b.const(f"{op.name}_cap", _vec(cap, len(op.shape)))], op.name)
            val[op.name] = x
        elif op.kind == "act":
            val[op.name] = _emit_act(b, op, val[op.inputs[0]])
        elif op.kind == "pool":
            x = b.node("GlobalAveragePool", [read(op.inputs[0], True)], f"{op.name}_pool" if len(op.shape) == 2 else op.name)
            if len(op.shape) == 2:
                if needs_q(op.name):   # the quantizer sits on the pooled value, before the flatten
                    val[f"{op.name}_pool"] = x
                    add_q(f"{op.name}_pool", op.name)
                    x = read(f"{op.name}_pool", True)
                x = b.node("Reshape", [x, b.const(f"{op.name}_shape", np.array([0, -1], np.int64))], op.name)
            val[op.name] = x
        elif op.kind == "maxpool":
            m = op.module
            k, s, p = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))
            val[op.name] = b.node("MaxPool", [read(op.inputs[0], True)], op.name, kernel_shape=k, strides=s,
                                  pads=[p[0], p[1], p[0], p[1]])
        elif op.kind == "flatten":
            val[op.name] = b.node("Reshape", [read(op.inputs[0], True),
                                              b.const(f"{op.name}_shape", np.array([0, -1], np.int64))], op.name)
        elif op.kind == "add":
            val[op.name] = b.node("Add", [read(x, True) for x in op.inputs], op.name)
        if op.kind != "output" and needs_q(op.name):
            add_q(op.name, op.name)
            q_points[op.name] = _node_grid(plan, op.name)
            if not enc_of[op.name].targets or (op.kind != "flatten" and not _feeds_target(op.name, plan, by_name)):
                extra.append(_describe(plan, op.name))
    graph = helper.make_graph(
        b.nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [in_dims[0], None])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="spiq")
    return model, extra, probes, q_points


def _describe(plan: _Plan, node_name: str) -> str:
    """A quantized tensor in the model's own names: the layer (or add) that produced it."""
    root = plan.enc_of[node_name].root
    what = f"{root.target} output" if root.kind == "layer" else f"residual add `{root.name}`"
    return what + (" (before the global pool)" if node_name in plan.pre_pool else "")


def _feeds_target(node_name: str, plan: _Plan, by_name: dict[str, _Op]) -> bool:
    """Whether an int8 layer reads this very node (not another node of its domain)."""
    readers = [by_name[u] for u in plan.users[node_name]]
    return any(r.kind == "layer" and plan.layers[r.target].int8 and plan.layers[r.target].enc_in is plan.enc_of[node_name]
               for r in readers)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _emit_act(b: _Builder, op: _Op, x: str) -> str:
    n = op.name
    if op.act == "silu":
        return b.node("Mul", [x, b.node("Sigmoid", [x], f"{n}_sig")], n)
    if op.act == "hardswish":
        return b.node("HardSwish", [x], n)
    if op.act == "hardsigmoid":
        return b.node("HardSigmoid", [x], n, alpha=1.0 / 6, beta=0.5)
    if op.act == "sigmoid":
        return b.node("Sigmoid", [x], n)
    if op.act == "tanh":
        return b.node("Tanh", [x], n)
    if op.act == "gelu":   # x·Φ(x) = 0.5·x·(1 + erf(x/√2))
        e = b.node("Erf", [b.node("Mul", [x, b.const(f"{n}_r", np.array(1 / math.sqrt(2), np.float32))], f"{n}_s")], f"{n}_erf")
        h = b.node("Add", [e, b.const(f"{n}_one", np.array(1.0, np.float32))], f"{n}_h")
        return b.node("Mul", [b.node("Mul", [x, h], f"{n}_xh"), b.const(f"{n}_half", np.array(0.5, np.float32))], n)
    raise ExportError(f"cannot export activation {op.act}")


def _emit_layer(b: _Builder, plan: _Plan, lp: _LayerPlan, val, qval, read, quantized: bool, probes) -> None:
    op = lp.op
    inner = op.module.layer if isinstance(op.module, QuantLayer) else op.module
    groups = getattr(inner, "groups", 1)
    x_node = op.inputs[0]
    e_in, e_out = lp.enc_in, plan.enc_of[op.name]
    ndim = 4 if isinstance(inner, nn.Conv2d) else 2
    int8 = lp.int8 and quantized
    pads = lp.pads
    if e_in.convert_for:   # explicit per-channel Mul/Add (and Pad) in front of this layer
        x = val[x_node]
        if lp.explicit_pad:
            top, left, bottom, right = pads
            x = b.node("Pad", [x, b.const(f"{op.name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))],
                       f"{op.name}_padded")
            pads = (0, 0, 0, 0)
        if not bool((e_in.a == 1).all()):
            x = b.node("Mul", [x, b.const(f"{op.name}_in_scale", _vec(e_in.a, ndim))], f"{op.name}_in_scaled")
        if bool((e_in.b != 0).any()):
            x = b.node("Add", [x, b.const(f"{op.name}_in_shift", _vec(e_in.b, ndim))], f"{op.name}_in_shifted")
        if int8:
            s = b.const(f"{op.name}_in_scale_q", np.array(e_in.S, np.float32))
            z = b.const(f"{op.name}_in_zero_q", np.array(e_in.Z, np.uint8))
            q = b.node("QuantizeLinear", [x, s, z], f"{op.name}_in_q")
            probes[lp.name] = q
            x = b.node("DequantizeLinear", [q, s, z], f"{op.name}_in_dq")
    else:
        x = read(x_node, int8)
        if int8:
            probes[lp.name] = qval[x_node][0]
    a_out, b_out = e_out.a, e_out.b
    w, bias, S_x, shift = _transformed_weights(lp, e_in, a_out, b_out, groups)
    name = op.name
    if int8:
        wscale = a_out * lp.wscale / S_x
        codes = lp.codes.clone()
        # A filter whose bias is beyond int32 on its own accumulator unit has weights some 1e-9 of
        # that bias (a BN gamma near 0): its output is its bias. Its codes are dropped and it takes
        # any scale that puts the bias within int32 (the change is below 1e-4 of its output).
        units = bias.abs() / (e_in.S * wscale)
        tiny = (units >= 2 ** 30) & (codes.flatten(1).abs().sum(1) > 0)
        if tiny.any():
            # the most the dropped weights could add, against the bias, on the accumulator
            bound = float((codes[tiny].flatten(1).abs().sum(1) * QMAX / units[tiny]).max())
            plan.dropped[lp.name] = (int(tiny.sum()), bound)
            codes[tiny] = 0
        empty = codes.flatten(1).abs().sum(1) == 0
        if empty.any() and not empty.all():
            wscale = torch.where(empty, wscale[~empty].median(), wscale)
        codes = codes.numpy().astype(np.int8)
        wz = np.zeros(codes.shape[0], np.int8)
        wq = b.node("DequantizeLinear", [b.const(f"{name}_w", codes),
                                         b.const(f"{name}_w_scale", wscale.numpy().astype(np.float32)),
                                         b.const(f"{name}_w_zero", wz)], f"{name}_weight", axis=0)
        # int32 bias on the accumulator's unit, which QLinearConv/QGemm require; the rounding is
        # below half a unit of the integer accumulator
        bscale = np.float32(e_in.S) * wscale.numpy().astype(np.float32)
        bcodes = np.round(bias.numpy() / bscale.astype(np.float64))
        if np.abs(bcodes).max(initial=0) >= 2 ** 31:
            raise ExportError(f"layer {lp.name}: its bias does not fit the int32 accumulator")
        realized = torch.from_numpy(bcodes * bscale.astype(np.float64))
        lp.int8_bias = (realized - b_out) / a_out + shift
        lp.int8_weight = lp.weight * _out_view((torch.from_numpy(codes).flatten(1).abs().sum(1) > 0).double(), lp.weight)
        bq = b.node("DequantizeLinear", [b.const(f"{name}_b", bcodes.astype(np.int32)), b.const(f"{name}_b_scale", bscale),
                                         b.const(f"{name}_b_zero", np.zeros(len(bscale), np.int32))], f"{name}_bias", axis=0)
    else:
        wq = b.const(f"{name}_weight", w.numpy().astype(np.float32))
        bq = b.const(f"{name}_bias", bias.numpy().astype(np.float32))
    if isinstance(inner, nn.Conv2d):
        val[name] = b.node("Conv", [x, wq, bq], name, kernel_shape=list(inner.kernel_size), strides=list(inner.stride),
                           dilations=list(inner.dilation), group=groups, pads=list(pads))
    else:
        val[name] = b.node("Gemm", [x, wq, bq], name, transB=1)


def _transformed_weights(lp: _LayerPlan, e_in: _Enc, a_out: torch.Tensor, b_out: torch.Tensor, groups: int):
    """The layer's weight and bias between its input domain and its output domain.

    y'_o = a_o·y_o + b'_o with y_o = Σ W[o,c,k]·x_c + bias_o and x_c = (x'_c - b_c) / a_c: the weight
    gets a_o / a_c, the bias a_o·(bias_o - Σ W[o,c,k]·b_c / a_c) + b'_o. For an int8 layer the
    weight is codes·wscale / step_c and a_c = S / step_c, so the integer codes stay as they are."""
    w = lp.weight
    inv_a = broadcast_input(1.0 / e_in.a, w, groups)
    w_t = w * inv_a * _out_view(a_out, w)
    shift = (w * broadcast_input(e_in.b / e_in.a, w, groups)).flatten(1).sum(1)
    if lp.int8:   # the same sum on the integers: exact, and what the int32 bias must carry
        shift = lp.wscale * (lp.codes * broadcast_input((e_in.b / e_in.S), w, groups)).flatten(1).sum(1)
    bias = a_out * (lp.bias - shift) + b_out
    return w_t, bias, e_in.S, shift


# --- the public entry points ----------------------------------------------------------------------

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
    plan: _Plan | None = field(default=None, repr=False)

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


def _input_shape_of(model: nn.Module, input_size: int | None) -> tuple[int, int, int]:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    channels = first.in_channels if isinstance(first, nn.Conv2d) else 3
    if input_size is None:
        pre = getattr(model, "spiq_preprocess", None)
        input_size = pre.crop if pre is not None else 224
    return channels, input_size, input_size


def prepare_for_export(model: nn.Module) -> nn.Module:
    """`model` itself if it is quantized (BN already folded), else a BN-folded float copy."""
    if hasattr(model, "spiq_int8_source"):   # an int8_twin: the graph it simulates is its source's
        return model.spiq_int8_source
    if hasattr(model, "spiq_report"):
        return model
    from spiq.transforms.fold import folded_copy

    folded = folded_copy(model)
    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules()):
        bn = next(n for n, m in folded.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
        raise ExportError(f"cannot export module `{bn}` (BatchNorm not after a conv): not supported by the int8 export")
    return folded


_NO_VIT = "int8 ONNX export handles convolutional networks; vision transformers are not exported yet"


def check_exportable(config) -> None:
    """Raise ExportError if the recipe `config` quantizes a layer in a way the int8 graph cannot run.

    Decided on the recipe alone, so that a caller can refuse before quantizing; export_onnx checks
    the config a quantized model carries with it, then each quantized layer itself.
    """
    if config.method in TRANSFORMER_ONLY:
        raise ExportError(_NO_VIT)
    layers = [("", config.method, config.input_bits, config.weight_bits)]
    layers += [(f"overrides[{name!r}]: ", ov.method or config.method, ov.input_bits or config.input_bits,
                ov.weight_bits or config.weight_bits) for name, ov in config.overrides.items() if not ov.skip]
    for where, method, abits, wbits in layers:
        if method not in DATA_FREE + CALIBRATED:
            raise ExportError(f"{where}method={method!r}: dynamic input quantization has no static int8 graph; "
                              "export a static method (spiq, static-tensor, calib-*)")
        if abits != 8:
            raise ExportError(f"{where}input_bits={abits}: the int8 export needs 8-bit inputs (ONNX Runtime's "
                              "integer kernels take uint8 activations and saturate at 255)")
        if wbits > 8:
            raise ExportError(f"{where}weight_bits={wbits}: the int8 export holds weights of at most 8 bits")


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, *, quantized: bool = True, input_size: int | None = None,
                batch: int | None = None) -> ExportReport:
    """Write `qmodel` (from spiq.quantize, or a float model) as an ONNX graph; return what was done.

    quantized=True: a QDQ graph with uint8 per-tensor activation quantizers and int8 per-channel
    weights, which ONNX Runtime fuses into QLinearConv/QLinearAdd/QGemm. quantized=False: the same
    graph with every scale folded but no quantizer (the "folded float" model, equal to
    `float_twin(qmodel, report)`). The input is the normalised image (N, 3, H, W), H = W =
    `input_size` (default: the model's preprocessing crop), fixed: padding is static. `batch`
    fixes the batch size (default: symbolic). On any error nothing is written at `path`.
    """
    proto, report = _export(qmodel, str(path), quantized, input_size, batch)
    _write_atomic(proto, Path(path))
    return report


def _export(qmodel: nn.Module, path: str, quantized: bool, input_size: int | None, batch: int | None):
    """The ONNX graph of export_onnx() and its report, in memory."""
    import onnx

    from spiq.models.vit import is_transformer

    if is_transformer(qmodel) or getattr(getattr(qmodel, "spiq_report", None), "liu", None) is not None:
        raise ExportError(_NO_VIT)
    if getattr(qmodel, "spiq_config", None) is not None:
        check_exportable(qmodel.spiq_config)
    model = prepare_for_export(qmodel)
    shape = _input_shape_of(model, input_size)
    plan = _plan_export(model, shape)
    proto, extra, plan.probes, plan.q_points = _build_onnx(plan, quantized, batch, "spiq")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the generated ONNX graph is invalid: {exc}") from exc
    layers = plan.layers
    if plan.dropped:
        n = sum(k for k, _ in plan.dropped.values())
        worst = max(b for _, b in plan.dropped.values())
        plan.notes.append(f"{n} filter(s) in {len(plan.dropped)} layer(s) have weights so small against their bias "
                          f"(a BN gamma near 0) that the int32 bias cannot hold both: kept as their bias only, which "
                          f"changes those outputs by at most {worst:.1e} of the bias")
    return proto, ExportReport(
        path=path, quantized=quantized, input_shape=[batch or "N", *shape],
        int8_layers=[n for n, lp in layers.items() if lp.int8],
        float_layers=[n for n, lp in layers.items() if not lp.int8],
        mul_layers={n: _mul_reason(lp, plan) for n, lp in layers.items()
                    if lp.int8 and lp.enc_in.convert_for and _has_mul(lp.enc_in)},
        requantized={n: _step_ratios(lp) for n, lp in layers.items() if lp.requantized},
        unified_zero=[n for n, lp in layers.items() if lp.int8 and lp.enc_in.unified],
        extra_quantizers=extra if quantized else [],
        op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        notes=list(plan.notes), plan=plan)


def _has_mul(e: _Enc) -> bool:
    return bool((e.a != 1).any() or (e.b != 0).any())


def _mul_reason(lp: _LayerPlan, plan: _Plan) -> str:
    src = plan.enc_of[lp.op.inputs[0]].root
    what = "the graph input" if src.kind == "input" else f"`{src.name}` ({src.act or src.kind})"
    return f"its per-channel input grid cannot be folded through {what}"


def _step_ratios(lp: _LayerPlan) -> tuple[float, float]:
    live = lp.grid.live & lp.spiq_grid.live
    if not live.any():
        return 1.0, 1.0
    r = lp.grid.step[live] / lp.spiq_grid.step[live]
    return float(r.min()), float(r.max())


def _write_atomic(proto, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def float_twin(qmodel: nn.Module, report: ExportReport, quantized: bool = False) -> nn.Module:
    """A torch copy of `qmodel` computing what the export wrote, in original units.

    quantized=False: no input quantizer, every layer with the weights and bias of the graph - what
    the folded float graph (export_onnx(..., quantized=False)) must equal. quantized=True: the
    simulation of the int8 graph's own layer grids (re-quantized layers included; the extra
    quantizers of the int8 kernels excluded)."""
    twin = copy.deepcopy(qmodel)
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


def int8_simulation(qmodel: nn.Module, report: ExportReport) -> nn.Module:
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


def _report_with_graph_grids(source: QuantReport, report: ExportReport) -> QuantReport:
    """source's report, but each layer the int8 graph re-quantized gives the shared grid it reads,
    so what reads a layer's range (the per-layer breakdown's clipping) sees the twin's; source's
    own report is left as it was."""
    layers = dict(source.layers)
    for name in report.requantized:
        grid, old = report.plan.layers[name].grid, source.layers[name]
        layers[name] = replace(
            old, input_bits=8, input_per_channel=True, range=Range(grid.lo.float(), grid.hi.float()),
            data_free_range_from=f"{old.data_free_range_from}; int8 graph: the residual stream's shared grid")
    return replace(source, layers=layers)


def int8_twin(qmodel: nn.Module, input_size: int | None = None) -> nn.Module:
    """`qmodel` as the int8 graph computes it (`int8_simulation` of the graph `export_onnx` would
    write), as a model of its own: what `quantize` returns for `QuantConfig(int8_graph=True)`.
    It keeps qmodel's report and config; exporting it writes qmodel's graph, which it simulates."""
    _, report = _export(qmodel, "", True, input_size, None)
    twin = int8_simulation(qmodel, report)
    for key, value in vars(qmodel).items():
        if key.startswith("spiq_"):
            setattr(twin, key, value)
    if getattr(qmodel, "spiq_report", None) is not None:
        twin.spiq_report = _report_with_graph_grids(qmodel.spiq_report, report)
    object.__setattr__(twin, "spiq_int8_source", qmodel)   # a plain attribute: not one of twin's modules
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def layer_sqnr(qmodel: nn.Module, report: ExportReport, images: torch.Tensor, batch: int = 16) -> list[dict]:
    """Per int8 layer: SQNR (dB) of its quantized input as ONNX Runtime computes it, against the
    simulation's fake-quantized input (the signal). The real input is read from the uint8 codes of
    its QuantizeLinear and mapped back to original units."""
    import onnx

    plan = report.plan
    if not report.quantized:
        raise ValueError("layer_sqnr needs the int8 graph (export_onnx(..., quantized=True))")
    model = onnx.load(report.path)
    names = dict(plan.probes)
    have = {o.name for o in model.graph.output}
    for q in names.values():
        if q not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(q, onnx.TensorProto.UINT8, None))
            have.add(q)
    with tempfile.TemporaryDirectory() as d:
        probe_path = Path(d) / "probe.onnx"
        onnx.save(model, str(probe_path))
        session = ort_session(probe_path)
        outputs = [o.name for o in session.get_outputs()]
        sig = Counter()
        err = Counter()
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(mod, args):
                captured[name] = fake_quant_input(args[0], mod.input_quant)
            return fn

        handles = [qmodel.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            for i in range(0, len(images), batch):
                x = images[i:i + batch]
                res = dict(zip(outputs, session.run(None, {"input": x.numpy()})))
                captured.clear()
                qmodel(x)
                for layer, q in names.items():
                    real = _decode(torch.from_numpy(res[q]), plan.layers[layer].enc_in)
                    sim = captured[layer]
                    sig[layer] += float((sim.double() ** 2).sum())
                    err[layer] += float(((sim.double() - real) ** 2).sum())
        finally:
            for h in handles:
                h.remove()
    rows = []
    for layer in names:
        lp = plan.layers[layer]
        rows.append({"layer": layer, "sqnr_db": sqnr_db(sig[layer], err[layer]),
                     "requantized": lp.requantized, "mul": bool(lp.enc_in.convert_for and _has_mul(lp.enc_in))})
    return rows


def _decode(codes: torch.Tensor, e: _Enc) -> torch.Tensor:
    shape = (1, -1) + (1,) * (codes.dim() - 2)
    x_t = (codes.double() - e.Z) * e.S
    return (x_t - e.b.view(shape)) / e.a.view(shape)


def _int8_graph_for_quantize(qmodel: nn.Module) -> nn.Module:
    try:
        return int8_twin(qmodel)
    except ExportError as exc:
        raise ConfigError(f"int8_graph: {exc}") from None


register_int8_graph(_int8_graph_for_quantize)
