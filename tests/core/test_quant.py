"""The float simulation must be the integer computation: integer codes, int accumulate, rescale."""
import pytest
import torch

import spiq
from spiq.core.quant import Grid, QuantLayer

LAYERS = ["conv_stem", "blocks.1.0.conv_dw", "blocks.2.1.conv_pw", "blocks.4.1.conv_pwl", "classifier"]


def _inputs(qmodel, names, x):
    seen = {}
    hooks = [qmodel.model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method,wbits,abits", [("spiq", 8, 4), ("spiq", 4, 8), ("static-tensor", 8, 6),
                                                ("calib-minmax", 6, 5)])
def test_simulation_equals_integer_arithmetic(lite0, sample, method, wbits, abits, lite0_loaded):
    images, _ = sample
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method=method, weight_bits=wbits, input_bits=abits, fold="always"),
                      calib_data=images[100:108])
    xs = _inputs(q, LAYERS, images[:4])
    for name in LAYERS:
        layer: QuantLayer = q.model.get_submodule(name)
        assert layer.folded == (method == "spiq")
        codes = layer.weight_codes
        assert codes.abs().max() <= Grid.WEIGHT.levels(wbits)[1] and torch.equal(codes, codes.round())
        bias = layer.layer.bias.detach().clone()
        with torch.no_grad():
            full = layer(xs[name])
            layer.layer.bias.zero_()  # compare the accumulators alone: a large bias hides float32 digits
            sim = layer(xs[name]).double()
            layer.layer.bias.copy_(bias)
            acc, scale = layer.integer_accumulator(xs[name])
        # The float simulation recovers the integer accumulator exactly, to well under one unit
        units = sim / scale
        assert (units - acc).abs().max() < 0.25, f"{name}: simulation is off the integer result"
        assert torch.allclose(layer.integer_forward(xs[name]), full, rtol=1e-4, atol=1e-4)


def test_spiq_folds_per_channel_input_scales_into_weights(lite0, lite0_loaded):
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4))
    layer = q.model.get_submodule("blocks.4.1.conv_pwl")
    s = layer.input_quant.scale
    assert s.shape == (layer.layer.in_channels,) and s.std() > 0  # one scale per input channel
    # integer weights times their per-output scale, divided by the input scales, is the simulated weight
    w_int = layer.weight_codes * layer.weight_scale.view(-1, 1, 1, 1)
    assert torch.allclose(w_int / s.view(1, -1, 1, 1), layer.layer.weight, rtol=1e-5, atol=1e-8)


@pytest.mark.slow   # quantizes the model under every fold choice and width: too long for the fast tier
def test_auto_fold_keeps_per_channel_scales_where_they_pay(lite0, lite0_loaded):
    """At 4-bit inputs every layer keeps per-channel scales; at 8-bit inputs and 4-bit weights the
    fold costs more weight precision than the inputs gain, and many layers go per tensor."""
    a4 = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4))
    w4 = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=4, input_bits=8))
    n_a4 = sum(r.input_per_channel for r in a4.report.layers.values())
    n_w4 = sum(r.input_per_channel for r in w4.report.layers.values())
    assert n_a4 >= 48 and n_w4 < 40
    for q in (a4, w4):
        for name, r in q.report.layers.items():
            layer = q.model.get_submodule(name)
            assert layer.folded == r.input_per_channel == layer.input_quant.per_channel


@pytest.mark.parametrize("method", ["spiq", "static-tensor", "dynamic-tensor", "dynamic-channel"])
def test_fast_inference_quantizers_equal_the_gradient_kernels(lite0, sample, method, lite0_loaded):
    """Without gradients the quantizers skip PyTorch's mask-building kernels: same logits, bit for bit.

    The normalised 8-bit pixels sit on half-steps of the first layer's grid, so ties are exercised."""
    images, _ = sample
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method=method, weight_bits=8, input_bits=4))
    x = images[:6]
    with torch.no_grad():
        fast = q(x)
    with torch.enable_grad():
        kernels = q(x.clone().requires_grad_(True)).detach()
    assert torch.equal(fast, kernels)
