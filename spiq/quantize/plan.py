"""`plan(model, config)`: what every layer of the quantized model will be, decided by each method's
handler, then the bias fit; quantize() applies it (spiq.quantize.apply)."""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from spiq.config import ConfigError, LayerSettings, QuantConfig
from spiq.methods.plans import MethodPlan, PlanContext
from spiq.methods.registry import Method, get_method
from spiq.models.data import Preprocess
from spiq.models.registry import LoadedModel
from spiq.models.vit import matmul_sites
from spiq.quantize.biasfit import bias_images_for, fit_biases
from spiq.quantize.check import check_config
from spiq.quantize.distill import has_batchnorm
from spiq.quantize.memo import Memo, Reference, quantizable_layers
from spiq.quantize.apply import apply
from spiq.quantize.report import QuantPlan, QuantResult
from spiq.ranges.laws import observe

Progress = Callable[[float, str], None]


@torch.no_grad()
def plan(model: nn.Module | LoadedModel, config: QuantConfig, calib_data: torch.Tensor | None = None,
         progress: Progress | None = None, memo: Memo | None = None, *,
         preprocess: Preprocess | None = None) -> QuantPlan:
    """What quantize() would make of `model` (its arguments, but for int8_graph, which acts on the
    result): each layer's plan from its method's handler, then the bias fit. `model` is left as it was."""
    return planned(model, config, calib_data, progress, memo, preprocess=preprocess)[0]


@torch.no_grad()
def planned(model: nn.Module | LoadedModel, config: QuantConfig, calib_data: torch.Tensor | None = None,
            progress: Progress | None = None, memo: Memo | None = None, *,
            preprocess: Preprocess | None = None) -> tuple[QuantPlan, QuantResult | None]:
    """`plan`'s plan, and `apply(plan)` where the bias fit made it on the way (None otherwise)."""
    if isinstance(model, LoadedModel):
        model, preprocess = model.model, preprocess or model.preprocess
    check_config(model, config)
    settings = {n: config.for_layer(n) for n in quantizable_layers(model)}
    used = list({s.method: get_method(s.method) for s in settings.values() if not s.skip}.values())
    needing = sorted(m.name for m in used if m.needs_calibration)
    if needing and calib_data is None:
        raise ConfigError(f"method {needing[0]!r} needs calibration images (calib_data)")
    memo = _memo_for(model, memo, preprocess)
    reference = memo.reference(config)
    fallbacks = dict(reference.propagation.fallbacks)
    if reference.bounds_from != "preprocess":
        fallbacks["<input>"] = reference.bounds_from
    fit_images = bias_images_for(config, model, reference.vit)
    if fit_images and (reference.vit is not None or not has_batchnorm(model)):
        fallbacks["<bias_images>"] = "no BatchNorm to distill images from: law bias correction only"
        fit_images = 0
    done = 0.9 if fit_images and not memo.images_ready(fit_images) else 0.0   # distilling: nearly all the work
    fit_on = memo.distilled_images(fit_images, progress) if fit_images else None
    calibrated, observed = _calibrate(memo, reference, settings, config, calib_data)
    ctx = PlanContext(config, settings, reference.folded, reference.propagation, reference.vit,
                      reference.matmul_laws or {}, calibrated, observed, calib_data, memo.scoped(config), fallbacks)
    planned = _plan_methods(ctx, used, progress, done)
    layers = {n: planned.layers[n] for n in settings if n in planned.layers}
    result = QuantPlan(config, layers, reference.folded, planned.matmuls, fallbacks, reference.propagation,
                       memo.preprocess, planned.extra, reference.equalized)
    applied = None
    if fit_on is not None:
        result, applied = _fit_biases(result, memo, fit_on, fit_images)
    if progress is not None:
        progress(1.0, "done")
    return result, applied


def _memo_for(model: nn.Module, memo: Memo | None, preprocess: Preprocess | None) -> Memo:
    if memo is None:
        return Memo(model, preprocess)
    if memo.source is not model:
        raise ValueError("`memo` was made for another model")
    if preprocess is not None and preprocess != memo.preprocess:
        raise ValueError("`memo` was made for another preprocess")
    return memo


def _calibrate(memo: Memo, reference: Reference, settings: dict[str, LayerSettings], config: QuantConfig,
               calib_data: torch.Tensor | None) -> tuple[dict, dict]:
    """The ranges the methods' calibration specs ask for, measured on the calibration images, and
    what was observed at a transformer's matmul operands, whose ranges are taken with theirs."""
    wanted = {}
    for n, s in settings.items():
        method = get_method(s.method)
        if not s.skip and method.calibration is not None:
            wanted[n] = method.calibration(s.input_bits, s.input_per_channel, config)
    sites = matmul_sites(reference.vit) if reference.vit is not None else {}
    calib_sites = [m for m, n in sites.items() if n in wanted]
    if calib_sites:   # a transformer's matmul operands: observed with its layers, every time
        observed = observe(reference.folded, list(wanted) + calib_sites, calib_data[: config.calib_images])
        return {n: w.measure(observed[n]) for n, w in wanted.items()}, observed
    if wanted:
        return memo.calibrated(config, calib_data, config.calib_images, wanted), {}
    return {}, {}


def _plan_methods(ctx: PlanContext, used: list[Method], progress: Progress | None, done: float) -> MethodPlan:
    """Each method's handler on its own layers; their plans together (extra: what each searched)."""
    layers, matmuls, searched = {}, {}, {}
    for k, method in enumerate(used):
        def part(f, what, k=k):
            progress(done + (1 - done) * (k + f) / len(used), what)

        found = method.plan(replace(ctx, progress=part if progress is not None else None), method)
        layers.update(found.layers)
        matmuls.update(found.matmuls)
        if found.extra is not None:
            searched[method.name] = found.extra
    return MethodPlan(layers, matmuls, searched)


def _fit_biases(plan: QuantPlan, memo: Memo, images: torch.Tensor, n: int) -> tuple[QuantPlan, QuantResult]:
    """The plan with each activated layer's bias fitted, in order, on n distilled images, and the
    fitted model, which is that plan applied."""
    activations, targets = memo.fit_targets(plan.config, n)
    q = apply(plan).model
    shifts = fit_biases(q, targets, images, activations)
    layers = dict(plan.layers)
    for name in shifts:
        if name in layers:
            reason = f"bias fitted on {n} images distilled from the BatchNorm statistics"
            layers[name] = replace(layers[name], bias=q.get_submodule(name).layer.bias.detach(),
                                   reasons=layers[name].reasons + (reason,))
    fitted = replace(plan, layers=layers, bias_images=n, bias_fit=shifts)
    return fitted, QuantResult(q, fitted, fitted.preprocess)
