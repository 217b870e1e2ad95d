"""The ONNX graph of an export plan: each op in its transformed domain, a per-tensor
QuantizeLinear/DequantizeLinear pair after every quantized tensor, int8 weights with int32 biases."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from torch import nn

from spiq.core.tensors import broadcast_input
from spiq.export.grids import QMAX, Enc, Grid, Int8Layer, out_view
from spiq.export.lower import Op
from spiq.export.plan import Plan, cap_subsumed, node_grid, node_quant
from spiq.export.support import ExportError
from spiq.graph.ops import layer_of

OPSET = 17
IR_VERSION = 8            # the IR that goes with opset 17: readable by every ONNX Runtime since 1.13


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


def build_onnx(plan: Plan, quantized: bool, batch: int | None, name: str):
    """The ONNX model of `plan`, the tensors it quantizes that the simulation keeps in float, the
    QuantizeLinear each int8 layer reads, and the grid of every quantizer after an fx node."""
    from onnx import TensorProto, helper

    g = _Graph(plan, quantized)
    for op in plan.ops:
        g.emit(op)
    in_dims = [batch if batch else "N", *plan.input_shape]
    graph = helper.make_graph(
        g.b.nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [in_dims[0], None])], g.b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="spiq")
    return model, g.extra, g.probes, g.q_points


class _Graph:
    """The ONNX nodes of one plan, op by op, and what they hold."""

    def __init__(self, plan: Plan, quantized: bool):
        self.plan, self.quantized, self.b = plan, quantized, _Builder()
        self.by_name = {op.name: op for op in plan.ops}
        self.val: dict[str, str] = {}                    # node -> float value (transformed domain)
        self.qval: dict[str, tuple[str, str, str]] = {}  # node -> (Q output, scale, zero) where a quantizer sits
        self.extra: list[str] = []
        self.probes: dict[str, str] = {}                 # layer -> the Q output it reads
        self.q_points: dict[str, Grid] = {}

    def emit(self, op: Op) -> None:
        b, val = self.b, self.val
        if op.kind == "input":
            val[op.name] = "input"
        elif op.kind == "output":
            b.node("Identity", [val[op.inputs[0]]], "logits")
            return
        elif op.kind == "layer":
            _Layer(self, self.plan.layers[op.target]).emit()
        elif op.kind == "relu":
            val[op.name] = self.relu(op)
        elif op.kind == "act":
            val[op.name] = _emit_act(b, op, val[op.inputs[0]])
        elif op.kind == "pool":
            val[op.name] = self.pool(op)
        elif op.kind == "maxpool":
            m = op.module
            k, s, p = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))
            val[op.name] = b.node("MaxPool", [self.read(op.inputs[0], True)], op.name, kernel_shape=k, strides=s,
                                  pads=[p[0], p[1], p[0], p[1]])
        elif op.kind == "flatten":
            val[op.name] = b.node("Reshape", [self.read(op.inputs[0], True),
                                              b.const(f"{op.name}_shape", np.array([0, -1], np.int64))], op.name)
        elif op.kind == "add":
            val[op.name] = b.node("Add", [self.read(x, True) for x in op.inputs], op.name)
        if self.needs_q(op.name):
            self.add_q(op.name, op.name)
            self.q_points[op.name] = node_grid(self.plan, op.name)
            if not self.plan.enc_of[op.name].targets or (op.kind != "flatten" and not self.feeds_target(op.name)):
                self.extra.append(_describe(self.plan, op.name))

    def add_q(self, node_name: str, key: str) -> None:
        S, Z = node_quant(self.plan, key)
        s = self.b.const(f"{node_name}_scale", np.array(S, np.float32))
        z = self.b.const(f"{node_name}_zero", np.array(Z, np.uint8))
        self.qval[node_name] = (self.b.node("QuantizeLinear", [self.val[node_name], s, z], f"{node_name}_q"), s, z)

    def read(self, node_name: str, int8: bool) -> str:
        """The value a consumer reads: a dedicated DequantizeLinear of the quantizer, or the float value."""
        if int8 and node_name in self.qval:
            q, s, z = self.qval[node_name]
            return self.b.node("DequantizeLinear", [q, s, z], self.b.fresh(f"{node_name}_dq"))
        return self.val[node_name]

    def needs_q(self, node_name: str) -> bool:
        if not self.quantized or node_quant(self.plan, node_name) is None:
            return False
        us = self.plan.users[node_name]
        return bool(us) and not all(self.by_name[u].kind == "relu" for u in us)

    def feeds_target(self, node_name: str) -> bool:
        """Whether an int8 layer reads this very node (not another node of its domain)."""
        plan = self.plan
        readers = [self.by_name[u] for u in plan.users[node_name]]
        return any(r.kind == "layer" and plan.layers[r.target].int8 and plan.layers[r.target].enc_in is plan.enc_of[node_name]
                   for r in readers)

    def relu(self, op: Op) -> str:
        b, e, x = self.b, self.plan.enc_of[op.name], self.val[op.inputs[0]]
        if op.cap is None or (self.quantized and cap_subsumed(self.plan, op.name, op.cap)):
            return b.node("Relu", [x], op.name)
        cap = e.a * op.cap + e.b
        if bool((cap == cap[0]).all()):   # one cap: a Clip, which quantizers know
            return b.node("Clip", [x, b.const(f"{op.name}_lo", np.array(0.0, np.float32)),
                                   b.const(f"{op.name}_hi", np.array(float(cap[0]), np.float32))], op.name)
        return b.node("Min", [b.node("Relu", [x], f"{op.name}_relu"),
                              b.const(f"{op.name}_cap", _vec(cap, len(op.shape)))], op.name)

    def pool(self, op: Op) -> str:
        b = self.b
        x = b.node("GlobalAveragePool", [self.read(op.inputs[0], True)], f"{op.name}_pool" if len(op.shape) == 2 else op.name)
        if len(op.shape) == 2:
            if self.needs_q(op.name):   # the quantizer sits on the pooled value, before the flatten
                self.val[f"{op.name}_pool"] = x
                self.add_q(f"{op.name}_pool", op.name)
                x = self.read(f"{op.name}_pool", True)
            x = b.node("Reshape", [x, b.const(f"{op.name}_shape", np.array([0, -1], np.int64))], op.name)
        return x


class _Layer:
    """One conv/linear of the graph: its input (through an explicit conversion where it has one),
    its weights and bias between its input's domain and its output's, and the Conv or Gemm."""

    def __init__(self, graph: _Graph, lp: Int8Layer):
        self.g, self.b, self.lp = graph, graph.b, lp
        self.name = lp.op.name
        self.inner = layer_of(lp.op.module)
        self.e_in, self.e_out = lp.enc_in, graph.plan.enc_of[self.name]
        self.int8 = lp.int8 and graph.quantized

    def emit(self) -> None:
        lp, inner, groups = self.lp, self.inner, getattr(self.inner, "groups", 1)
        x, pads = self.input()
        w, bias, shift = _transformed_weights(lp, self.e_in, self.e_out.a, self.e_out.b, groups)
        if self.int8:
            wq, bq = self.int8_weights(bias, shift)
        else:
            wq = self.b.const(f"{self.name}_weight", w.numpy().astype(np.float32))
            bq = self.b.const(f"{self.name}_bias", bias.numpy().astype(np.float32))
        if isinstance(inner, nn.Conv2d):
            self.g.val[self.name] = self.b.node(
                "Conv", [x, wq, bq], self.name, kernel_shape=list(inner.kernel_size), strides=list(inner.stride),
                dilations=list(inner.dilation), group=groups, pads=list(pads))
        else:
            self.g.val[self.name] = self.b.node("Gemm", [x, wq, bq], self.name, transB=1)

    def input(self) -> tuple[str, tuple[int, int, int, int]]:
        """The value the layer reads and the padding left to the Conv."""
        b, lp, e_in, name = self.b, self.lp, self.e_in, self.name
        x_node, pads = lp.op.inputs[0], lp.pads
        if not e_in.convert_for:
            x = self.g.read(x_node, self.int8)
            if self.int8:
                self.g.probes[lp.name] = self.g.qval[x_node][0]
            return x, pads
        # an explicit per-channel Mul/Add (and Pad) in front of this layer
        ndim = 4 if isinstance(self.inner, nn.Conv2d) else 2
        x = self.g.val[x_node]
        if lp.explicit_pad:
            top, left, bottom, right = pads
            x = b.node("Pad", [x, b.const(f"{name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))],
                       f"{name}_padded")
            pads = (0, 0, 0, 0)
        if not bool((e_in.a == 1).all()):
            x = b.node("Mul", [x, b.const(f"{name}_in_scale", _vec(e_in.a, ndim))], f"{name}_in_scaled")
        if bool((e_in.b != 0).any()):
            x = b.node("Add", [x, b.const(f"{name}_in_shift", _vec(e_in.b, ndim))], f"{name}_in_shifted")
        if self.int8:
            s = b.const(f"{name}_in_scale_q", np.array(e_in.S, np.float32))
            z = b.const(f"{name}_in_zero_q", np.array(e_in.Z, np.uint8))
            q = b.node("QuantizeLinear", [x, s, z], f"{name}_in_q")
            self.g.probes[lp.name] = q
            x = b.node("DequantizeLinear", [q, s, z], f"{name}_in_dq")
        return x, pads

    def int8_weights(self, bias: torch.Tensor, shift: torch.Tensor) -> tuple[str, str]:
        """DequantizeLinear of the int8 weight codes and of the int32 bias; records what they hold."""
        b, lp, e_in, name = self.b, self.lp, self.e_in, self.name
        a_out, b_out = self.e_out.a, self.e_out.b
        wscale = a_out * lp.wscale / e_in.S
        codes = self._drop_tiny(lp.codes.clone(), bias.abs() / (e_in.S * wscale))
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
        lp.int8_weight = lp.weight * out_view((torch.from_numpy(codes).flatten(1).abs().sum(1) > 0).double(), lp.weight)
        bq = b.node("DequantizeLinear", [b.const(f"{name}_b", bcodes.astype(np.int32)), b.const(f"{name}_b_scale", bscale),
                                         b.const(f"{name}_b_zero", np.zeros(len(bscale), np.int32))], f"{name}_bias", axis=0)
        return wq, bq

    def _drop_tiny(self, codes: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """`codes` without the filters whose bias is beyond int32 on their accumulator unit (`units`).

        Such a filter's weights are some 1e-9 of its bias (a BN gamma near 0): its output is its
        bias. Its codes are dropped and it takes any scale that puts the bias within int32 (the
        change is below 1e-4 of its output)."""
        tiny = (units >= 2 ** 30) & (codes.flatten(1).abs().sum(1) > 0)
        if tiny.any():
            # the most the dropped weights could add, against the bias, on the accumulator
            bound = float((codes[tiny].flatten(1).abs().sum(1) * QMAX / units[tiny]).max())
            self.g.plan.dropped[self.lp.name] = (int(tiny.sum()), bound)
            codes[tiny] = 0
        return codes


def _transformed_weights(lp: Int8Layer, e_in: Enc, a_out: torch.Tensor, b_out: torch.Tensor, groups: int):
    """The layer's weight and bias between its input domain and its output domain.

    y'_o = a_o·y_o + b'_o with y_o = Σ W[o,c,k]·x_c + bias_o and x_c = (x'_c - b_c) / a_c: the weight
    gets a_o / a_c, the bias a_o·(bias_o - Σ W[o,c,k]·b_c / a_c) + b'_o. For an int8 layer the
    weight is codes·wscale / step_c and a_c = S / step_c, so the integer codes stay as they are."""
    w = lp.weight
    inv_a = broadcast_input(1.0 / e_in.a, w, groups)
    w_t = w * inv_a * out_view(a_out, w)
    shift = (w * broadcast_input(e_in.b / e_in.a, w, groups)).flatten(1).sum(1)
    if lp.int8:   # the same sum on the integers: exact, and what the int32 bias must carry
        shift = lp.wscale * (lp.codes * broadcast_input((e_in.b / e_in.S), w, groups)).flatten(1).sum(1)
    bias = a_out * (lp.bias - shift) + b_out
    return w_t, bias, shift


def _describe(plan: Plan, node_name: str) -> str:
    """A quantized tensor in the model's own names: the layer (or add) that produced it."""
    root = plan.enc_of[node_name].root
    what = f"{root.target} output" if root.kind == "layer" else f"residual add `{root.name}`"
    return what + (" (before the global pool)" if node_name in plan.pre_pool else "")


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _emit_act(b: _Builder, op: Op, x: str) -> str:
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
