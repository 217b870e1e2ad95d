"""Evaluation scores: the logit SQNR and the paired differences the accuracy benchmark reports beside agreement."""
import torch

from spiq import QuantConfig
from spiq.analysis.evaluate import calibration_split, calibration_subset, evaluate, logits, paired_difference
from spiq.core.metrics import mean_logit_sqnr_db


def test_logit_sqnr_orders_bit_widths_and_leaves_the_scores_as_they_were(lite0, lite0_loaded, subset):
    x, y, fp_pred = subset
    x, y, fp_pred = x[:40], y[:40], fp_pred[:40]
    fp_logits = logits(lite0, x)
    assert torch.equal(fp_logits.argmax(1), fp_pred)
    assert abs(mean_logit_sqnr_db(fp_logits, 1.1 * fp_logits) - 20.0) < 1e-3   # an error a tenth of the signal

    scores, agrees = {}, {}
    for abits in (8, 4):
        config = QuantConfig(weight_bits=8, input_bits=abits)
        plain = evaluate("efficientnet_lite0", x, y, config, float_model=lite0_loaded, fp_pred=fp_pred)
        with_logits = evaluate("efficientnet_lite0", x, y, config, float_model=lite0_loaded, fp_logits=fp_logits)
        # the same predictions either way; the CLI's JSON keeps its exact keys
        assert (plain.top1, plain.agreement) == (with_logits.top1, with_logits.agreement)
        assert "logit_sqnr_db" not in plain.to_dict() and "logit_sqnr_db" in with_logits.to_dict()
        scores[abits] = with_logits.logit_sqnr_db
        assert "predictions" not in with_logits.to_dict()
        agrees[abits] = with_logits.predictions == fp_pred
        assert agrees[abits].float().mean().item() == with_logits.agreement
    # 8-bit inputs keep the logits far closer to the float model's than 4-bit ones
    assert scores[8] > scores[4] + 10 and scores[4] > 0

    # the paired difference is the difference of the agreements; its interval is set by the images
    # on which the two differ, and vanishes for a method against itself
    diff, half = paired_difference(agrees[8], agrees[4])
    assert abs(diff - (agrees[8].double().mean() - agrees[4].double().mean()).item()) < 1e-9
    assert diff > 0 and 0 < half < 1
    assert paired_difference(agrees[4], agrees[4]) == (0.0, 0.0)
    assert paired_difference(agrees[4], agrees[8]) == (-diff, half)


def test_calibration_split_holds_the_calibration_images_out(subset):
    x = subset[0]
    calib, rest = calibration_split(len(x), 32)
    assert len(calib) == 32 and len(rest) == len(x) - 32
    assert set(calib.tolist()).isdisjoint(rest.tolist()) and set(calib.tolist()) | set(rest.tolist()) == set(range(len(x)))
    assert torch.equal(x[calib], calibration_subset(x, 32))   # the calib-* methods' images
    assert not torch.equal(calibration_split(len(x), 32, seed=1)[0], calib)
