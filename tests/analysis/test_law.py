"""Law versus reality on the embedded EfficientNet-Lite0: the law drawn is the quantizer's own, the
clipped shares are what a direct count gives."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spiq
from spiq.core.hooks import run_with_hooks
from spiq.analysis.law import histogram_edges, law_counts, law_vs_reality
from spiq.analysis.layers import channel_spread
from spiq.ranges.laws import clip_range
from spiq.ui import plots

ROOT = Path(__file__).resolve().parents[2]
# SPIQ as in the paper (every layer per input channel) at 4-bit inputs, where clipping shows
CONFIG = spiq.QuantConfig(input_bits=4, fold="always", bias_images=0)


@pytest.fixture(scope="module")
def setting(lite0_loaded):
    q = spiq.quantize(lite0_loaded, CONFIG)
    x = lite0_loaded.preprocess(Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB"))[None]
    spread = channel_spread(q, 8)
    return q, x, max(spread, key=spread.get)


def test_the_drawn_law_is_the_one_the_quantizer_used(setting):
    q, x, layer = setting
    lv = law_vs_reality(q, x, layer)
    c = lv.channel
    assert lv.law is q.report.propagation.inputs[layer]   # the very object quantize() searched on
    samples, weights = lv.law.samples()
    assert torch.equal(lv.law_x, samples[c]) and torch.equal(lv.law_w, weights)
    # the range the quantized layer holds is the one these law parameters give at its bits
    applied = q.report.layers[layer].range
    assert applied.per_channel and (float(applied.lo[c]), float(applied.hi[c])) == lv.spiq_range
    again = clip_range(lv.law, lv.bits, True, CONFIG.clip_penalty)
    assert torch.equal(again.lo, applied.lo) and torch.equal(again.hi, applied.hi)
    tensor = clip_range(lv.law, lv.bits, False, CONFIG.clip_penalty)
    assert lv.tensor_range == (float(tensor.lo), float(tensor.hi))
    # the figure's curve is the law's mass per bin: recomputed here from its samples, bin by bin
    hist, _ = plots.law_vs_reality(lv)
    edges = histogram_edges(lv)
    n = lv.observed.numel()
    direct = [n * float(weights[(samples[c] >= a) & ((samples[c] < b) if i < len(edges) - 2 else (samples[c] <= b))].sum())
              for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
    assert np.allclose(hist.data[1].y, direct, rtol=1e-4, atol=1e-3)
    assert np.array_equal(hist.data[0].y, np.histogram(lv.observed.numpy(), edges)[0])
    # another channel's law would draw another curve
    other = (c + 1) % lv.law.channels
    assert not np.allclose(law_counts(law_vs_reality(q, x, layer, other), edges), hist.data[1].y)


def _layer_input(q, layer: str, x: torch.Tensor) -> dict:
    """{"x": what `layer` of the float reference receives on `x`}, captured apart from the library."""
    seen = {}
    run_with_hooks(q.report.reference, {layer: lambda m, a: seen.__setitem__("x", a[0].detach().clone())}, x,
                   pre=True)
    return seen


def test_clipped_shares_are_a_direct_count(setting):
    q, x, layer = setting
    seen = _layer_input(q, layer, x)
    lv = law_vs_reality(q, x, layer)
    values = seen["x"][0, lv.channel].flatten()
    assert torch.equal(lv.observed.sort().values, values.sort().values)
    (s_lo, s_hi), (t_lo, t_hi) = lv.spiq_range, lv.tensor_range
    assert lv.clipped_spiq == pytest.approx(float(((values < s_lo) | (values > s_hi)).float().mean()))
    assert lv.clipped_tensor == pytest.approx(float(((values < t_lo) | (values > t_hi)).float().mean()))
    # by default: the channel SPIQ's range clips most on this image
    assert lv.clipped_spiq == pytest.approx(float(lv.clipped_spiq_all.max()))
    if lv.clipped_spiq == 0:
        pytest.fail("at 4 bits some channel of this layer should be clipped on the coffee image")


def test_predicted_against_observed_spread_for_every_channel(setting):
    q, x, layer = setting
    lv = law_vs_reality(q, x, layer, 0)
    channels = lv.law.channels
    assert lv.predicted_std.shape == lv.observed_std.shape == (channels,)
    assert torch.equal(lv.predicted_std, lv.law.moments()[1])
    seen = _layer_input(q, layer, x)
    assert torch.allclose(lv.observed_std, seen["x"][0].flatten(1).std(1, correction=0), rtol=1e-4)
    # the BatchNorm law tracks reality: channels predicted wider are wider on the image
    pred, obs = lv.predicted_std.log().numpy(), lv.observed_std.clamp_min(1e-6).log().numpy()
    assert np.corrcoef(pred, obs)[0, 1] > 0.3
    fig = plots.law_vs_reality(lv)[1]
    assert len(fig.data[0].x) == channels


def test_layers_without_a_batchnorm_law_are_refused_by_name(setting):
    q, x, _ = setting
    with pytest.raises(ValueError, match="normalised image"):
        law_vs_reality(q, x, "conv_stem")
    with pytest.raises(KeyError, match="not a quantizable layer"):
        law_vs_reality(q, x, "blocks.99")
    with pytest.raises(ValueError, match="input channels 0 to"):
        law_vs_reality(q, x, "classifier", 5000)
