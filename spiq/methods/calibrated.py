"""calib-minmax, calib-percentile, calib-mse: static input ranges measured on calibration images."""
from __future__ import annotations

from dataclasses import dataclass

from spiq.config import ConfigError, QuantConfig
from spiq.core.tensors import Range
from spiq.methods.plans import LayerInput
from spiq.methods.registry import Method, register
from spiq.ranges.laws import Observed, calibrated_range


@dataclass(frozen=True)
class CalibratedRange:
    """A range measured on calibration images by `rule` ("minmax", "percentile", "mse"). Only what
    the rule reads is set: min/max and percentile ranges do not depend on the bits."""
    rule: str
    bits: int | None
    per_channel: bool
    percentile: float | None = None

    def measure(self, observed: Observed) -> Range:
        return calibrated_range(observed, self.rule, self.bits, self.per_channel, self.percentile or 99.99)


def measured(x: LayerInput) -> Range:
    """The range quantize() measured for this input, as `calibration` asked."""
    return x.calibrated[x.name]


def validate(config: QuantConfig) -> None:
    """The percentile of calib-percentile, and the calibration images (liu-ptq reads them too)."""
    if isinstance(config.percentile, bool) or not isinstance(config.percentile, (int, float)) \
            or not 50 < config.percentile <= 100:
        raise ConfigError(f"percentile must be in (50, 100], got {config.percentile!r}")
    n = config.calib_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"calib_images must be a positive integer, got {n!r}")


def _calibrated(rule: str, description: str, options: tuple[str, ...]) -> Method:
    def calibration(bits: int, per_channel: bool, config: QuantConfig) -> CalibratedRange:
        return CalibratedRange(rule, bits if rule == "mse" else None, per_channel,
                               config.percentile if rule == "percentile" else None)

    return register(Method(f"calib-{rule}", description, needs_calibration=True, int8_graph=True,
                           options=options + ("calib_images",), input_range=measured, calibration=calibration,
                           validate=validate))


MINMAX = _calibrated("minmax", "static ranges from calibration images: min/max", ())
PERCENTILE = _calibrated("percentile", "static ranges from calibration images: percentile", ("percentile",))
MSE = _calibrated("mse", "static ranges from calibration images: MSE-optimal clipping", ())
