"""Analysis for the app's views, on the real model and real images: SQNR, ranges, fold, maps, attribution."""
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import spiq
from spiq.analysis import layers as analysis
from spiq.ui import plots
from spiq.analysis.attribution import attribution_drift, last_stage
from spiq.models.data import IMAGENET_CLASSES
from spiq.analysis.evaluate import predict


@pytest.fixture(scope="module")
def q4(lite0, lite0_loaded):
    return spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=4))


def test_layer_sqnr_isolated_and_propagated(lite0, q4, sample):
    rows = analysis.layer_sqnr(lite0, q4, sample[0][:2])
    assert len(rows) == 50 and rows[0].name == "conv_stem"
    assert rows[0].isolated == pytest.approx(rows[0].propagated)  # nothing comes before the first layer
    # errors accumulate: late layers see far more error than they make themselves
    late = rows[-10:]
    assert sum(r.propagated < r.isolated for r in late) >= 8
    assert isinstance(plots.layer_sqnr(rows), go.Figure)


def test_channel_ranges_show_the_per_channel_gain(lite0, q4, sample):
    cr = analysis.channel_ranges(lite0, q4, "blocks.5.0.conv_pwl", sample[0][:2])
    c = cr.data_free_hi.numel()
    assert c == 672 and cr.observed_hi.shape == (c,) and cr.clipped.shape == (c,)
    # most channels get a finer grid of their own (the shared range clips the widest ones instead)
    assert (cr.step < cr.tensor_step).float().mean() > 0.5
    assert cr.effective_bits.mean() > cr.effective_bits_tensor.mean()
    assert (cr.effective_bits <= 4 + 1e-6).all()
    fig = plots.channel_ranges(cr)
    assert len(fig.data) == 6 and len(fig.data[0].x) == 96
    # the channels' own bits, the shared grid's bits and the clipped share, channel by channel
    own, shared, clipped = fig.data[3:]
    widest = np.argsort(-cr.data_free_hi.numpy())[:96]
    np.testing.assert_allclose(own.y, cr.effective_bits.numpy()[widest])
    np.testing.assert_allclose(shared.y, cr.effective_bits_tensor.numpy()[widest])
    np.testing.assert_allclose(clipped.y, 100 * cr.clipped.numpy()[widest])
    with pytest.raises(KeyError):
        analysis.channel_ranges(lite0, q4, "no.such.layer", sample[0][:1])


def test_fold_cost_is_small_against_the_input_gain(lite0, q4):
    rows = analysis.fold_cost(lite0, q4)
    assert len(rows) >= 45  # at 4-bit inputs (nearly) every layer keeps its per-channel scales
    lost = sum(r.weight_sqnr - r.weight_sqnr_folded for r in rows) / len(rows)
    gained = sum(r.input_sqnr_channel - r.input_sqnr_tensor for r in rows) / len(rows)
    assert 0 <= gained and lost < 1.0
    assert all(math.isfinite(r.weight_sqnr_folded) for r in rows)
    assert isinstance(plots.fold_cost(rows), go.Figure)


def test_error_maps_and_predictions(lite0, q4, sample):
    x = sample[0][7]
    maps = analysis.error_maps(lite0, q4, x, ["blocks.1.0.conv_dw", "conv_head"])
    assert set(maps) == {"blocks.1.0.conv_dw", "conv_head", "logits"}
    for m in maps.values():
        assert m.shape == (224, 224) and m.max() > 0 and torch.isfinite(m).all()
    cmp = analysis.compare_predictions(lite0, q4, x, IMAGENET_CLASSES)
    assert len(cmp.float.classes) == 5 and abs(sum(cmp.float.probs) - 1) < 0.5
    assert cmp.flipped == (cmp.float.classes[0] != cmp.quant.classes[0])
    img = (x.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1).mul(255).byte().numpy()
    assert len(plots.error_map(img, maps["logits"]).data) == 2
    _check_predictions_figure(plots.predictions(cmp), cmp)


def _check_predictions_figure(fig, cmp):
    """Float above quantized: each panel's bars are its top-5 probabilities, labelled with its classes."""
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, top in zip(axes, (cmp.float, cmp.quant)):
        widths = [bar.get_width() for bar in ax.patches]
        np.testing.assert_allclose(widths, top.probs[::-1], rtol=1e-6)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(labels) == len(top.classes)
        for label, name in zip(labels, top.classes[::-1]):   # a long class name is cut, marked with "…"
            assert label == name or (label.endswith("…") and name.startswith(label[:-1]))


def test_attribution_drift_follows_flips(lite0, subset, lite0_loaded):
    x, _, fp = subset
    assert last_stage(lite0) == "bn2"
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=4, input_bits=4))
    flipped = (predict(q, x) != fp).nonzero().flatten()
    kept = (predict(q, x) == fp).nonzero().flatten()
    assert len(flipped) > 0 and len(kept) > 0
    bad = attribution_drift(lite0, q, x[flipped[0]], "integrated-gradients")
    # straight-through gradients: the quantized model's attribution is a real, non-constant map
    assert bad.quant_map.std() > 0 and bad.quant_map.abs().sum() > 0
    assert not torch.allclose(bad.quant_map, bad.float_map)
    good = attribution_drift(lite0, spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=8)),
                             x[kept[0]], "integrated-gradients")
    assert good.rank_correlation > bad.rank_correlation
    cam = attribution_drift(lite0, q, x[flipped[0]], "grad-cam")
    assert cam.quant_map.shape == (224, 224) and cam.float_map.max() > 0
    img = (x[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1).mul(255).byte().numpy()
    assert len(plots.attribution(img, bad).data) == 6
