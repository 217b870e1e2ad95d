"""The model's fx graph lowered to the ops the int8 export writes (`Op`), node kinds read from
`spiq.graph.ops`; pass-through nodes become aliases of their source."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from spiq.export.support import SUPPORTED, ExportError
from spiq.graph.ops import (ACT, ADD, GLOBAL_POOL, IDENTITY, LAYER, MAXPOOL, RELU, RESHAPE, act_name, layer_of, module_kind,
                            op_kind, relu_cap)
from spiq.graph.trace import LeafTracer

# the activations `export.emit` writes as ONNX ops
EMITTED_ACTS = ("silu", "hardswish", "gelu", "sigmoid", "tanh", "hardsigmoid")


@dataclass
class Op:
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


def trace_shaped(model: nn.Module, input_shape: tuple[int, int, int]) -> fx.GraphModule:
    """`model` traced with every node's tensor shape for one (1, *input_shape) input."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.GraphModule(model, LeafTracer().trace(model))
    except Exception as exc:
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    return gm


def graph_ops(gm: fx.GraphModule) -> list[Op]:
    """The model's fx graph as export ops; pass-through nodes are resolved to their source."""
    ops: list[Op] = []
    alias: dict[str, str] = {}

    def src(a) -> str:
        if not isinstance(a, fx.Node):
            raise ExportError(f"cannot export: expected a tensor argument, got {a!r}")
        return alias.get(a.name, a.name)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lowered: Op | str = Op(node.name, "input", [], _shape(node))
        elif node.op == "output":
            lowered = Op(node.name, "output", [src(node.args[0])])
        elif node.op == "call_module":
            lowered = _lower_module(gm, node, src)
        elif node.op in ("call_function", "call_method"):
            lowered = _lower_call(node, op_kind(gm, node), src)
        else:
            raise _unsupported(node, f"`{node.op}` node")
        if isinstance(lowered, Op):
            ops.append(lowered)
        else:
            alias[node.name] = lowered
    return ops


def _lower_module(gm: fx.GraphModule, node: fx.Node, src: Callable) -> Op | str:
    """A call_module node's Op, or the name of the value it passes on unchanged."""
    mod = gm.get_submodule(node.target)
    kind, shape = module_kind(mod), _shape(node)
    shape_in = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else ()
    if kind == LAYER:
        inner = layer_of(mod)
        if isinstance(inner, nn.Conv2d) and inner.padding_mode != "zeros":
            raise _unsupported(node, f"module `{node.target}` (Conv2d with padding_mode={inner.padding_mode!r})")
        return Op(node.name, "layer", [src(node.args[0])], shape, mod, node.target)
    if kind == IDENTITY or (kind == RESHAPE and shape == shape_in):
        return src(node.args[0])
    if kind == RESHAPE and len(shape) == 2 and shape_in[2:] in ((1, 1), ()):
        return Op(node.name, "flatten", [src(node.args[0])], shape)
    if kind == RELU:
        cap = relu_cap(mod)
        return Op(node.name, "relu", [src(node.args[0])], shape, cap=cap.double() if torch.is_tensor(cap) else cap)
    if kind == ACT and act_name(mod) in EMITTED_ACTS and getattr(mod, "approximate", "none") == "none":
        return Op(node.name, "act", [src(node.args[0])], shape, act=act_name(mod))
    # timm's selectable pool says which pooling it does; torch's adaptive one averages
    if kind == GLOBAL_POOL and getattr(mod, "pool_type", "avg") in ("avg", "fast", "fastavg") \
            and _is_global_pool(shape_in, shape):
        return Op(node.name, "pool", [src(node.args[0])], shape)
    if kind == MAXPOOL and not mod.ceil_mode and mod.dilation in (1, (1, 1)):
        return Op(node.name, "maxpool", [src(node.args[0])], shape, mod)
    raise _unsupported(node, f"module `{node.target}` ({type(mod).__name__})")


def _lower_call(node: fx.Node, kind: str | None, src: Callable) -> Op | str:
    """A call_function or call_method node's Op, or the name of the value it passes on unchanged."""
    fn, name, shape = node.target, _fn_name(node.target), _shape(node)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if kind == ADD and len(tensors) == 2 and len(node.args) == 2 and _shape(tensors[0]) == _shape(tensors[1]) == shape:
        return Op(node.name, "add", [src(tensors[0]), src(tensors[1])], shape)
    if len(tensors) != 1:
        raise _unsupported(node, f"op `{name}`")
    x = tensors[0]
    if kind == RELU:
        return Op(node.name, "relu", [src(x)], shape, cap=relu_cap(fn))
    if kind == ACT and act_name(fn) in EMITTED_ACTS and node.kwargs.get("approximate", "none") == "none":
        return Op(node.name, "act", [src(x)], shape, act=act_name(fn))
    if kind == IDENTITY:
        return src(x)
    if kind == RESHAPE and len(shape) == 2 and _shape(x)[2:] in ((1, 1), ()):
        return src(x) if _shape(x) == shape else Op(node.name, "flatten", [src(x)], shape)
    if kind == GLOBAL_POOL and _is_global_pool(_shape(x), shape) and _pools_spatially(node):
        return Op(node.name, "pool", [src(x)], shape)
    raise _unsupported(node, f"op `{name}`")


def _fn_name(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))


def _unsupported(node: fx.Node, what: str) -> ExportError:
    return ExportError(f"cannot export {what} (fx node `{node.name}`): not supported by the int8 export "
                       f"(supported: {SUPPORTED})")


def _shape(node: fx.Node) -> tuple:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _is_global_pool(shape_in: tuple, shape_out: tuple) -> bool:
    return len(shape_in) == 4 and (shape_out[2:] == (1, 1) or len(shape_out) == 2)


def _pools_spatially(node: fx.Node) -> bool:
    if _fn_name(node.target) != "mean":
        return node.args[1] in (1, (1, 1)) if len(node.args) > 1 else node.kwargs.get("output_size") in (1, (1, 1))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return tuple(sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))) == (2, 3)
