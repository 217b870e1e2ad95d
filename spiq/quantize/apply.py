"""`apply(plan)`: the quantized copy of a model, made from what its plan decided."""
from __future__ import annotations

import copy

import torch
from torch import nn

from spiq.core.quant import QuantLayer
from spiq.quantize.report import QuantPlan, QuantResult


def apply(plan: QuantPlan) -> QuantResult:
    """The quantized copy of the plan's reference: each planned layer's weights, bias and input
    quantizer, each attention matmul operand's quantizer, and the bias fit's shift of each layer
    left float (eval mode, no gradients on parameters)."""
    q = copy.deepcopy(plan.reference)
    for name, lp in plan.layers.items():
        layer = q.get_submodule(name)
        layer.weight.data = lp.weight
        if lp.bias is not None:
            if layer.bias is None:
                layer.bias = nn.Parameter(lp.bias, requires_grad=False)
            else:
                layer.bias.data = lp.bias
        q.set_submodule(name, QuantLayer(layer, lp.input_quant, lp.weight_codes, lp.weight_scale, lp.folded, name))
    for site, quant in plan.matmuls.items():
        q.get_submodule(site).quant = quant
    for name, shift in plan.bias_fit.items():   # the fit shifts the layers left float too
        if name not in plan.layers:
            layer = q.get_submodule(name)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
            layer.bias.data = layer.bias.data - shift
    return QuantResult(q, plan, plan.preprocess)
