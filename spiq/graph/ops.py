"""What each node of a traced graph is: one table of op kinds, by module type, function and method.

Range propagation (`ranges.laws`), the int8 export's lowering (`export.lower`), Grad-CAM's layer
search (`analysis.attribution`), equalization and every producer search read this table, so they
agree on what a node does. Each reader handles the kinds it models and treats the rest as unknown.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from spiq.core.quant import GridQuant, QuantLayer

LAYER = "layer"              # a conv or linear, bare or quantized
BATCHNORM = "batchnorm"
RELU = "relu"                # ReLU, ReLU6, ChannelReLU6: commute with a positive per-channel scale
ACT = "act"                  # any other elementwise activation; `act_name` says which
ADD = "add"                  # elementwise sum (residual add)
MUL = "mul"                  # elementwise product (squeeze-excitation's gate)
GLOBAL_POOL = "global_pool"  # adaptive average pooling, a mean (over positions, for a global pool)
POOL = "pool"                # local average pooling
MAXPOOL = "maxpool"
IDENTITY = "identity"        # the same values: Identity, dropout and stochastic depth in eval, copies
RESHAPE = "reshape"          # the same values in another shape
GETITEM = "getitem"          # an item or a slice
FAKE_QUANT = "fake_quant"    # a quantizer of the int8 graph (GridQuant): its output stands for its input

# A producer search walks through these: the values stay the producer's.
PASSTHROUGH = frozenset({IDENTITY, RESHAPE, GETITEM, FAKE_QUANT})


class ChannelReLU6(nn.Module):
    """A ReLU6 whose channels were divided by s_c: min(max(x, 0), cap_c) with cap_c = 6 / s_c."""
    fx_leaf = True

    def __init__(self, cap: torch.Tensor):
        super().__init__()
        self.register_buffer("cap", cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (N, C, ...)
        return torch.minimum(x.clamp_min(0), self.cap.view(-1, *([1] * (x.dim() - 2))))

    def on_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The same on channels-first (C,) and (C, K) tensors, as the data-free laws hold them."""
        return torch.minimum(x.clamp_min(0), self.cap.view(-1, *([1] * (x.dim() - 1))))


def _timm_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    try:
        from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d
    except ImportError:  # timm is optional for torchvision-only use
        return (), (), ()
    return (BatchNormAct2d,), (SelectAdaptivePool2d,), (Conv2dSame,)


def _stochastic_depth() -> tuple:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return ()
    return (stochastic_depth,)


TIMM_BATCHNORM_ACTS, TIMM_POOLS, SAME_PADDED = _timm_types()   # SAME_PADDED: TF "same", padded per input size
QUANTIZABLE = (nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm1d)
RELUS = (nn.ReLU, nn.ReLU6, ChannelReLU6)
ACT_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
               nn.Hardsigmoid: "hardsigmoid", nn.LeakyReLU: "leaky_relu"}
ACTIVATIONS = RELUS + tuple(ACT_MODULES)

# First match wins: timm's BatchNormAct2d is a BatchNorm2d.
MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    (QUANTIZABLE + (QuantLayer,), LAYER),
    (BATCHNORMS, BATCHNORM),
    (RELUS, RELU),
    (tuple(ACT_MODULES), ACT),
    ((nn.AdaptiveAvgPool2d,) + TIMM_POOLS, GLOBAL_POOL),
    ((nn.AvgPool2d,), POOL),
    ((nn.MaxPool2d,), MAXPOOL),
    ((nn.Identity, nn.Dropout), IDENTITY),
    ((nn.Flatten,), RESHAPE),
    ((GridQuant,), FAKE_QUANT),
)
FUNCTION_KINDS = {
    operator.add: ADD, operator.iadd: ADD, torch.add: ADD,
    operator.mul: MUL, torch.mul: MUL,
    F.relu: RELU, torch.relu: RELU, F.relu6: RELU,
    F.silu: ACT, F.hardswish: ACT, F.gelu: ACT, torch.sigmoid: ACT, F.sigmoid: ACT, torch.tanh: ACT,
    F.hardsigmoid: ACT,
    F.adaptive_avg_pool2d: GLOBAL_POOL, torch.mean: GLOBAL_POOL,
    F.dropout: IDENTITY, torch.dropout: IDENTITY, torch.clone: IDENTITY,
    **{fn: IDENTITY for fn in _stochastic_depth()},
    torch.flatten: RESHAPE, torch.reshape: RESHAPE,
    operator.getitem: GETITEM,
}
METHOD_KINDS = {
    "add": ADD, "add_": ADD, "mul": MUL, "relu": RELU, "sigmoid": ACT, "tanh": ACT, "mean": GLOBAL_POOL,
    "contiguous": IDENTITY, "clone": IDENTITY, "flatten": RESHAPE, "view": RESHAPE, "reshape": RESHAPE,
}
_FUNCTION_ACTS = {F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", torch.tanh: "tanh", F.hardsigmoid: "hardsigmoid", "sigmoid": "sigmoid",
                  "tanh": "tanh"}


def module_kind(mod: nn.Module) -> str | None:
    for types, kind in MODULE_KINDS:
        if isinstance(mod, types):
            return kind
    return None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The kind of a call node, or None: an op no reader models (placeholders and outputs too)."""
    if node.op == "call_module":
        return module_kind(gm.get_submodule(node.target))
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target)
    return None


def act_name(op: nn.Module | object) -> str:
    """The name of an ACT-kind module, function or method ("silu", "gelu"...)."""
    if isinstance(op, nn.Module):
        return next(name for t, name in ACT_MODULES.items() if isinstance(op, t))
    return _FUNCTION_ACTS[op]


def relu_cap(op: nn.Module | object) -> float | torch.Tensor | None:
    """The cap of a RELU-kind module, function or method: 6 for ReLU6, per channel for ChannelReLU6."""
    if isinstance(op, ChannelReLU6):
        return op.cap
    return 6.0 if isinstance(op, nn.ReLU6) or op is F.relu6 else None


def layer_of(mod: nn.Module) -> nn.Module:
    """The conv or linear of a LAYER-kind module (a QuantLayer's own)."""
    return mod.layer if isinstance(mod, QuantLayer) else mod
