import math

import spiq
import torch

from spiq.analysis.layers import layer_breakdown

from spiq.core.metrics import sqnr_db


def test_breakdown_separates_input_and_weight_error(lite0, sample, lite0_loaded):
    images = sample[0][::50][:6]
    a4 = layer_breakdown(lite0, spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=4)), images)
    a8 = layer_breakdown(lite0, spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=8)), images)
    assert [r.name for r in a4] == [r.name for r in a8] and len(a4) == 50
    for r4, r8 in zip(a4, a8):
        assert all(math.isfinite(v) for v in (r4.input, r4.weight, r4.both))
        # four more input bits are worth up to 24 dB on the input-only error (less where the
        # 8-bit range is chosen wider, to clip less)
        assert r8.input > r4.input + 10, r4.name
        # the error of the whole layer is no smaller than its input error alone (to rounding noise)
        assert r4.both <= r4.input + 0.5, r4.name
    # at W8 the folded weights cost far less than 4-bit inputs: the inputs decide
    assert sum(r.weight > r.input for r in a4) == len(a4)


def test_minmax_ranges_clip_nothing_on_their_own_images(lite0, sample, lite0_loaded):
    calib = sample[0][:4]
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="calib-minmax", input_granularity="channel"),
                      calib_data=calib)
    rows = layer_breakdown(lite0, q, calib)
    assert all(r.clipped == 0 for r in rows)


def test_bit_aware_heavy_tailed_ranges_beat_the_losers_at_4_bits(lite0, sample, lite0_loaded):
    """n·σ fits one bit width at most, and a Gaussian law clips the heavy-tailed channels: the
    expected-error range under Student-t laws gives the best logits of the three."""
    x = sample[0][::20]
    with torch.no_grad():
        y = lite0(x)

        def logit_sqnr(**fields):
            yq = spiq.quantize(lite0_loaded, spiq.QuantConfig(input_bits=4, fold="always", **fields))(x)
            return sqnr_db(float((y ** 2).sum()), float(((yq - y) ** 2).sum()))

        best = logit_sqnr()
        for loser in (dict(range_rule="sigma", n_sigma=4.0), dict(range_rule="sigma", n_sigma=12.0),
                      dict(tail="gauss", tail_depthwise="gauss", tail_sum="gauss")):
            assert best > logit_sqnr(**loser) + 1.0, loser


def test_channel_spread_finds_the_residual_stream_inputs_from_bn_statistics_alone(lite0_loaded):
    from spiq.analysis.layers import channel_spread

    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(weight_bits=8, input_bits=8, bias_images=0))   # ranges only
    spread = channel_spread(q, 8)
    ranked = sorted(spread, key=spread.get, reverse=True)
    # the expansion convs read the un-activated residual stream, whose channels BN shifts and
    # scales apart; a projection after ReLU6 reads channels that all span about [0, 6]
    assert all(n.endswith(".conv_pw") and not n.startswith("blocks.0.") for n in ranked[:5]), ranked[:5]
    assert spread[ranked[0]] > 2 * spread["blocks.5.0.conv_pwl"]
    assert spread["conv_stem"] < 0.1   # the image's three channels share one normalised range
