"""Graph analysis: who feeds whom.

The model is traced with torch.fx, keeping convolutions, linears, norms, activations and pools as
opaque leaves, so the graph speaks in the model's own module names. Everything downstream (BN
folding, range propagation, the quantized layers) reads this one graph.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from torch import fx, nn

from spiq.core.errors import SpiqError
from spiq.graph.ops import BATCHNORMS, PASSTHROUGH, QUANTIZABLE, TIMM_BATCHNORM_ACTS, TIMM_POOLS, op_kind

LEAF_TYPES = QUANTIZABLE + BATCHNORMS + (nn.LayerNorm, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout,
                                         nn.Identity, nn.Flatten) + TIMM_BATCHNORM_ACTS + TIMM_POOLS


# fx patches nn.Module.__call__ and __getattr__ on the class, for every thread, while it traces;
# two traces at once would also restore each other's patches in the wrong order.
_TRACING = threading.Lock()


class LeafTracer(fx.Tracer):
    """Traces one model at a time in the process, and only the tracing thread's module calls: a
    server's other threads keep running their models (the shared float one included) untouched
    while, say, an export traces."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # fx_leaf: the project's own modules (QuantLayer, GridQuant, ChannelReLU6), traced whole like nn's
        return isinstance(m, LEAF_TYPES) or getattr(m, "fx_leaf", False) or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        with _TRACING:
            self._thread = threading.get_ident()
            return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class GraphError(SpiqError, RuntimeError):
    """The model could not be traced into a graph."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace `model` (not modified) into an fx graph whose call_module targets are its own names."""
    try:
        graph = LeafTracer().trace(model)
    except Exception as exc:
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    return fx.GraphModule(model, graph)


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a node only moves, copies or re-quantizes its input: a producer search walks through it."""
    return op_kind(gm, node) in PASSTHROUGH


@dataclass
class LayerNode:
    """A quantizable layer and the node that feeds its input."""
    name: str
    module: nn.Module
    node: fx.Node
    input: fx.Node


@dataclass
class ModelGraph:
    gm: fx.GraphModule
    layers: dict[str, LayerNode] = field(default_factory=dict)


def analyse(model: nn.Module) -> ModelGraph:
    gm = trace(model)
    g = ModelGraph(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QUANTIZABLE):
                g.layers[node.target] = LayerNode(node.target, mod, node, node.args[0])
    return g


def conv_bn_pairs(g: ModelGraph) -> list[tuple[str, str]]:
    """(conv, bn) names where the BN reads only that conv's output and the conv feeds only the BN."""
    pairs = []
    for name, layer in g.layers.items():
        if not isinstance(layer.module, nn.Conv2d) or len(layer.node.users) != 1:
            continue
        (user,) = layer.node.users
        if user.op != "call_module":
            continue
        bn = g.gm.get_submodule(user.target)
        if isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.module.out_channels:
            pairs.append((name, user.target))
    return pairs
