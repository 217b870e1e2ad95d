"""The SPIQ W8A8 export plan handed to ONNX Runtime's own quantizer, for bench/ort_quantizer.py.

The folded float model: SPIQ's per-channel input grids folded into the weights and biases, every
tensor in its transformed domain, each int8 weight exactly its codes times one scale per output
channel, exported with torch.onnx (asymmetric pads folded into the Convs). Each plan node matched to
its ONNX tensor; the TensorQuantOverrides that carry the plan's grids (per activation tensor its
(scale, zero point), per weight its per-output-channel scales, zero point 0); the nodes left in
float; quantize_static with a dummy CalibrationDataReader (the overrides fix every quantized
tensor); and the quantized model read back against what was asked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spiq.core.tensors import broadcast_input
from spiq.export.grids import out_view
from spiq.export.plan import cap_subsumed, node_quant
from spiq.graph.ops import layer_of

OPSET = 17

# --- the folded float model --------------------------------------------------------------------

def _layer_weights(lp, e_in, e_out, groups: int):
    """(codes, per-output scale, bias) of one int8 layer between its input and output domains.

    A local copy of what spiq/export/emit.py computes privately (`_transformed_weights` and
    `_Layer.int8_weights` with `_drop_tiny`): the weight in the transformed domains is
    codes · a_out·wscale / S_in, the bias a_out·(bias − shift) + b_out, and a filter whose bias is
    beyond int32 on its accumulator unit keeps its bias only (codes 0, the median scale)."""
    w = lp.weight
    shift = lp.wscale * (lp.codes * broadcast_input(e_in.b / e_in.S, w, groups)).flatten(1).sum(1)
    bias = e_out.a * (lp.bias - shift) + e_out.b
    wscale = e_out.a * lp.wscale / e_in.S
    codes = lp.codes.clone()
    units = bias.abs() / (e_in.S * wscale)
    codes[(units >= 2 ** 30) & (codes.flatten(1).abs().sum(1) > 0)] = 0
    empty = codes.flatten(1).abs().sum(1) == 0
    if empty.any() and not empty.all():
        wscale = torch.where(empty, wscale[~empty].median(), wscale)
    return codes, wscale, bias


class FoldedFloat(nn.Module):
    """The export plan's graph in float, op by op, every tensor in its transformed domain: what the
    int8 graph computes without its quantizers. int8 layers hold codes × scale exactly, so a
    quantizer with those scales gives the codes back. A ReLU6 whose cap the quantizer after it
    subsumes is a ReLU (as in the hand-written graph); asymmetric ("same") padding is an F.pad,
    folded into the Conv after export (`fold_pads`)."""

    def __init__(self, plan):
        super().__init__()
        self.ops = [(op.name, op.kind, list(op.inputs), len(op.shape)) for op in plan.ops]
        self.convs = nn.ModuleDict()
        self.pads, self.caps, self.convert = {}, {}, {}
        self.weights = {}   # layer node -> (codes, scales) the int8 graph must hold
        for op in plan.ops:
            if op.kind == "relu" and op.cap is not None and not cap_subsumed(plan, op.name, op.cap):
                e = plan.enc_of[op.name]
                self.caps[op.name] = (e.a * torch.as_tensor(op.cap, dtype=torch.float64) + e.b).float()
            if op.kind != "layer":
                continue
            lp = plan.layers[op.target]
            inner = layer_of(op.module)
            groups = getattr(inner, "groups", 1)
            e_in, e_out = lp.enc_in or plan.enc_of[op.inputs[0]], plan.enc_of[op.name]
            if lp.int8:
                codes, wscale, bias = _layer_weights(lp, e_in, e_out, groups)
                weight = codes * out_view(wscale, codes)
                self.weights[op.name] = (codes, wscale)
            else:   # stays float in both graphs (excluded from quantization)
                weight = lp.weight * broadcast_input(1.0 / e_in.a, lp.weight, groups) * out_view(e_out.a, lp.weight)
                shift = (lp.weight * broadcast_input(e_in.b / e_in.a, lp.weight, groups)).flatten(1).sum(1)
                bias = e_out.a * (lp.bias - shift) + e_out.b
            if e_in.convert_for and e_in.has_mul:
                self.convert[op.name] = (e_in.a.float().view(1, -1, 1, 1), e_in.b.float().view(1, -1, 1, 1))
            if isinstance(inner, nn.Conv2d):
                top, left, bottom, right = lp.pads
                sym = (top == bottom and left == right)
                m = nn.Conv2d(inner.in_channels, inner.out_channels, inner.kernel_size, inner.stride,
                              (top, left) if sym else 0, inner.dilation, groups, bias=True)
                if not sym:
                    self.pads[op.name] = (left, right, top, bottom)
            else:
                m = nn.Linear(inner.in_features, inner.out_features, bias=True)
            m.weight.data, m.bias.data = weight.float().contiguous(), bias.float().contiguous()
            self.convs[op.name] = m
        self.eval()

    def forward(self, x):
        env = {}
        for name, kind, inputs, ndim in self.ops:
            h = env[inputs[0]] if inputs else x
            if kind == "input":
                env[name] = x
            elif kind == "output":
                return h
            elif kind == "layer":
                if name in self.convert:
                    h = h * self.convert[name][0] + self.convert[name][1]
                if name in self.pads:
                    h = F.pad(h, self.pads[name])
                env[name] = self.convs[name](h)
            elif kind == "relu":
                env[name] = F.relu(h) if name not in self.caps else torch.minimum(F.relu(h), self.caps[name].view(1, -1, 1, 1))
            elif kind == "pool":
                h = F.adaptive_avg_pool2d(h, 1)
                env[name] = torch.flatten(h, 1) if ndim == 2 else h
            elif kind == "flatten":
                env[name] = torch.flatten(h, 1)
            elif kind == "add":
                env[name] = h + env[inputs[1]]
            else:
                raise NotImplementedError(f"FoldedFloat: op kind {kind} ({name}) is not needed for EfficientNet-Lite0")
        raise RuntimeError("no output")


def fold_pads(model, folded: FoldedFloat) -> int:
    """Fold each F.pad of `folded` into the Conv that reads it (its own `pads`), in place; drop the
    nodes left unused (torch.onnx computes a Pad's pads with Shape/Slice/Cast nodes).

    torch's Conv2d pads symmetrically only, so the folded model's asymmetric ("same") padding is an
    F.pad; the quantizer would quantize the Pad on its own (QDQPad), and ONNX Runtime's Pad+Conv
    fusion runs before its QDQ fusions, so it is folded in the float graph, as the hand-written
    graph has it (Conv pads = top, left, bottom, right)."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    folded_n = 0
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        name = conv.input[1][len("convs."):-len(".weight")]
        if name not in folded.pads:
            continue
        pad = producer[conv.input[0]]
        if pad.op_type != "Pad":
            raise RuntimeError(f"{name}: expected a Pad in front, got {pad.op_type}")
        left, right, top, bottom = folded.pads[name]
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep + [helper.make_attribute("pads", [top, left, bottom, right])])
        conv.input[0] = pad.input[0]
        folded_n += 1
    outputs = {o.name for o in g.output}
    while True:
        used = {x for n in g.node for x in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {x for n in g.node for x in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return folded_n


def export_folded_float(plan, path: Path, input_shape) -> FoldedFloat:
    import onnx

    folded = FoldedFloat(plan)
    with torch.no_grad():
        torch.onnx.export(folded, (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
    proto = onnx.load(str(path))
    folded.n_pads_folded = fold_pads(proto, folded)
    onnx.save(proto, str(path))
    return folded


# --- which ONNX tensor is which plan node, and its overrides -------------------------------------

def onnx_values(proto, plan) -> dict[str, str]:
    """Plan node -> the ONNX value of the exported folded float model (found by structure: each
    Conv/Gemm by its weight's parameter name, every other op as the consumer of its input)."""
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    by_weight = {n.input[1]: n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    kinds = {"relu": ("Relu", "Min", "Clip"), "add": ("Add",), "pool": ("GlobalAveragePool",),
             "flatten": ("Flatten",), "maxpool": ("MaxPool",)}
    val: dict[str, str] = {}

    def consumer(x, types):
        c = [n for n in consumers.get(x, []) if n.op_type in types]
        if len(c) != 1:
            raise RuntimeError(f"cannot match {x} -> {types}: {[n.op_type for n in consumers.get(x, [])]}")
        return c[0]

    for op in plan.ops:
        if op.kind == "input":
            val[op.name] = "input"
        elif op.kind == "output":
            continue
        elif op.kind == "layer":
            val[op.name] = by_weight[f"convs.{op.name}.weight"].output[0]
        elif op.kind == "add":
            a, b = val[op.inputs[0]], val[op.inputs[1]]
            val[op.name] = next(n for n in consumers[a] if n.op_type == "Add" and b in n.input).output[0]
        elif op.kind in kinds:
            n = consumer(val[op.inputs[0]], kinds[op.kind])
            if n.op_type == "Min":
                raise NotImplementedError("per-channel ReLU6 caps (Min) are not needed for EfficientNet-Lite0")
            if op.kind == "pool" and len(op.shape) == 2:
                val[op.name + ":pooled"] = n.output[0]
                n = consumer(n.output[0], ("Flatten",))
            val[op.name] = n.output[0]
        else:
            raise NotImplementedError(op.kind)
    return val


def overrides_for(plan, folded: FoldedFloat, val: dict[str, str]):
    """TensorQuantOverrides: per activation tensor its (scale, zero point), per int8 weight its
    per-channel scales (axis 0, zero point 0); and the tensors expected to be quantized."""
    act: dict[str, tuple[float, int]] = {}
    for name, v in val.items():
        q = node_quant(plan, name.split(":")[0])
        if q is not None:
            act[v] = (float(q[0]), int(q[1]))
    # what each int8 layer reads: its enc_in (a conversion's own S, Z where the input is fixed)
    for op in plan.ops:
        if op.kind == "layer" and plan.layers[op.target].int8:
            e = plan.layers[op.target].enc_in
            src = val[op.inputs[0]]
            if src in act and act[src] != (float(e.S), int(e.Z)):
                raise RuntimeError(f"{op.name}: its input's quantizer {act[src]} is not its enc_in {(e.S, e.Z)}")
            act[src] = (float(e.S), int(e.Z))
    overrides = {t: [{"scale": np.array(s, np.float32), "zero_point": np.array(z, np.uint8)}] for t, (s, z) in act.items()}
    weights = {}
    for name, (codes, wscale) in folded.weights.items():
        w = f"convs.{name}.weight"
        overrides[w] = [{"axis": 0, "scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
                        for s in wscale.float().tolist()]
        weights[w] = (codes, wscale.float())
    return overrides, act, weights


def excluded_nodes(proto, folded: FoldedFloat) -> list[str]:
    """Nodes the quantizer must leave in float: the per-channel conversion (Mul/Add) in front of a
    layer reading a fixed-domain tensor (its per-channel grid has no per-tensor override), and
    layers that stay float."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        name = n.input[1][len("convs."):-len(".weight")]
        if name not in folded.weights:
            out.append(n.name)
        if name in folded.convert:
            x = producer.get(n.input[0])
            while x is not None and x.op_type in ("Add", "Mul"):
                out.append(x.name)
                x = producer.get(x.input[0])
    return out


def ort_quantize(float_path: Path, out_path: Path, overrides, exclude: list[str], calib: torch.Tensor) -> dict:
    """quantize_static with every quantized tensor's parameters given; the options that matter."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Dummy(CalibrationDataReader):   # the overrides fix every quantized tensor's parameters
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    extra = {"TensorQuantOverrides": overrides,
             # else ORT raises a weight scale wherever input_scale·weight_scale cannot hold the bias in int32
             "QDQDisableWeightAdjustForInt32Bias": True,
             # the logits stay float, as in the hand-written graph (QDQGemm quantizes its output otherwise)
             "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    quantize_static(str(float_path), str(out_path), Dummy(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options=extra)
    return {k: v for k, v in extra.items() if k != "TensorQuantOverrides"} | {"nodes_to_exclude": exclude}


def check_overrides(path: Path, act: dict[str, tuple[float, int]], weights: dict) -> dict:
    """Read the quantized model back: every QuantizeLinear's (scale, zero point) and every weight's
    codes and scales against what was asked."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"}
    get = {**consts, **inits}.__getitem__
    out = {"activation_quantizers": 0, "activation_ok": 0, "not_overridden": [], "mismatched": [],
           "weights": 0, "weight_scales_ok": 0, "weight_codes_ok": 0, "weight_mismatched": []}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            out["activation_quantizers"] += 1
            x, s, z = n.input[0], float(get(n.input[1])), int(get(n.input[2]))
            if x not in act:
                out["not_overridden"].append({"tensor": x, "scale": s, "zero": z})
            elif np.float32(act[x][0]) == np.float32(s) and act[x][1] == z:
                out["activation_ok"] += 1
            else:
                out["mismatched"].append({"tensor": x, "asked": act[x], "got": (s, z)})
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and n.input[0][:-10] in weights:
            w = n.input[0][:-10]
            codes, wscale = weights[w]
            out["weights"] += 1
            got_scale, got_codes = get(n.input[1]), get(n.input[0])
            ok_s = np.array_equal(got_scale.astype(np.float32), wscale.numpy())
            ok_c = np.array_equal(got_codes.astype(np.int64), codes.numpy().astype(np.int64))
            out["weight_scales_ok"] += ok_s
            out["weight_codes_ok"] += ok_c
            if not (ok_s and ok_c):
                out["weight_mismatched"].append(w)
    return out
