"""Which example image shows SPIQ's point at first sight: the float model is sure of it, and at
low input bits SPIQ keeps its top-1 while a per-tensor static range flips it or loses logits SQNR."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from spiq.analysis.layers import compare_predictions
from spiq.models.registry import LoadedModel
from spiq.quantize.report import QuantResult

# A clear winner, not a near-tie that any small error flips (the cat's tiger / Egyptian 37 % / 37 %).
CLEAR_MARGIN = 1.5
MIN_GAP_DB = 2.0   # the logit SQNR SPIQ must gain over static per-tensor where neither flips


@dataclass
class ExampleScore:
    name: str
    float_top1: str
    float_prob: float
    margin: float            # top-1 probability over the runner-up's
    spiq_kept: bool
    static_flipped: bool
    sqnr_gain_db: float      # SPIQ's logit SQNR minus static per-tensor's

    @property
    def confident(self) -> bool:
        return self.margin >= CLEAR_MARGIN

    @property
    def shows_spiq(self) -> bool:
        return self.confident and self.spiq_kept and (self.static_flipped or self.sqnr_gain_db >= MIN_GAP_DB)

    def to_dict(self) -> dict:
        return {**asdict(self), "confident": self.confident, "shows_spiq": self.shows_spiq}


@torch.no_grad()
def score_example(loaded: LoadedModel, name: str, x: torch.Tensor, spiq: QuantResult,
                  static: QuantResult) -> ExampleScore:
    """`x`: one preprocessed image; `spiq` and `static`: the two methods at the same bits."""
    s = compare_predictions(loaded.model, spiq, x, loaded.classes)
    t = compare_predictions(loaded.model, static, x, loaded.classes)
    probs = s.float.probs
    return ExampleScore(name, s.float.classes[0], probs[0], probs[0] / max(probs[1], 1e-12), not s.flipped,
                        t.flipped, s.logit_sqnr - t.logit_sqnr)


def example_order(scores: list[ExampleScore]) -> list[str]:
    """The images that show SPIQ's point first (the largest SQNR gain first), then the others, the
    float model's surest first."""
    showing = sorted((s for s in scores if s.shows_spiq), key=lambda s: -s.sqnr_gain_db)
    rest = sorted((s for s in scores if not s.shows_spiq), key=lambda s: -s.float_prob)
    return [s.name for s in showing + rest]
