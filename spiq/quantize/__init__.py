"""`quantize(model, config)`: the float model's quantized copy, `apply(plan(model, config))`, with
the plan of every decision as its report."""
from spiq.quantize.api import check_config, methods_for, quantize
from spiq.quantize.memo import Memo, quantizable_layers
from spiq.quantize.apply import apply
from spiq.quantize.plan import plan
from spiq.quantize.report import QuantPlan, QuantResult

__all__ = ["Memo", "QuantPlan", "QuantResult", "apply", "check_config", "methods_for", "plan", "quantizable_layers",
           "quantize"]
