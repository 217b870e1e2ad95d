"""Evaluation scores: the logit SQNR the accuracy benchmark reports beside agreement."""
import torch

from spiq import QuantConfig
from spiq.evaluate import evaluate, logits, mean_logit_sqnr_db


def test_logit_sqnr_orders_bit_widths_and_leaves_the_scores_as_they_were(lite0, subset):
    x, y, fp_pred = subset
    x, y, fp_pred = x[:40], y[:40], fp_pred[:40]
    fp_logits = logits(lite0, x)
    assert torch.equal(fp_logits.argmax(1), fp_pred)
    assert abs(mean_logit_sqnr_db(fp_logits, 1.1 * fp_logits) - 20.0) < 1e-3   # an error a tenth of the signal

    scores = {}
    for abits in (8, 4):
        config = QuantConfig(weight_bits=8, input_bits=abits)
        plain = evaluate("efficientnet_lite0", x, y, config, float_model=lite0, fp_pred=fp_pred)
        with_logits = evaluate("efficientnet_lite0", x, y, config, float_model=lite0, fp_logits=fp_logits)
        # the same predictions either way; the CLI's JSON keeps its exact keys
        assert (plain.top1, plain.agreement) == (with_logits.top1, with_logits.agreement)
        assert "logit_sqnr_db" not in plain.to_dict() and "logit_sqnr_db" in with_logits.to_dict()
        scores[abits] = with_logits.logit_sqnr_db
    # 8-bit inputs keep the logits far closer to the float model's than 4-bit ones
    assert scores[8] > scores[4] + 10 and scores[4] > 0
