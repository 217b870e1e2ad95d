"""`quantize(model, config)`: a quantized copy of a float model; the original is never touched."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from spiq.config import ConfigError, LayerSettings, QuantConfig
from spiq.methods.liu import LiuPlan
from spiq.methods.registry import METHODS, Method, get_method, validate
from spiq.models.data import Preprocess
from spiq.models.registry import LoadedModel
from spiq.models.vit import matmul_sites, vit_graph
from spiq.quantize.biasfit import bias_images_for, fit_biases
from spiq.quantize.distill import has_batchnorm
# bias_shift and plan_layer: spiq.export re-quantizes layers with them, from here
from spiq.quantize.layer import bias_shift, plan_layer, quantize_layer, quantize_matmul  # noqa: F401
from spiq.quantize.prepared import Prepared, prepare, prepared_key, quantizable_layers
from spiq.quantize.report import QuantReport, QuantResult
from spiq.ranges.laws import calibrated_range, observe


def methods_for(model: nn.Module) -> list[str]:
    """The methods that apply to `model` (the transformer-only ones to vision transformers only)."""
    return [n for n, m in METHODS.items() if not m.transformer_only or vit_graph(model) is not None]


def check_config(model: nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError if `config` cannot quantize `model`: an option its method refuses, an
    override naming a layer the model does not have, or a method (model-wide or per layer) that
    does not apply to it."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    validate(config)
    config.check_layers(quantizable_layers(model))
    transformer_only = sorted(n for n in config.methods_named() if get_method(n).transformer_only)
    if transformer_only and vit_graph(model) is None:
        raise ConfigError(f"method {transformer_only[0]!r} is for vision transformers; "
                          f"{type(model).__name__} is not one")


@torch.no_grad()
def quantize(model: nn.Module | LoadedModel, config: QuantConfig, calib_data: torch.Tensor | None = None,
             progress: Callable[[float, str], None] | None = None, prepared: Prepared | None = None, *,
             preprocess: Preprocess | None = None) -> QuantResult:
    """A quantized copy of `model` (eval mode), with its report; `model` itself is left as it was.

    `model` is what load_model() returned, or a bare module with its `preprocess` (the input
    normalisation gives the first layer's data-free range; without it ImageNet mean/std is assumed
    and the report says so). `calib_data` (N, 3, H, W) preprocessed images are needed only by the
    calib-* methods and liu-ptq. `prepared` is `prepare(model, config, preprocess)` kept from an
    earlier call, to re-quantize fast.
    """
    if isinstance(model, LoadedModel):
        model, preprocess = model.model, preprocess or model.preprocess
    check_config(model, config)
    settings = {n: config.for_layer(n) for n in quantizable_layers(model)}
    used = _methods_used(settings)
    _check_calibration_data(used, calib_data)
    prepared = _prepared_for(model, config, prepared, preprocess)
    q = copy.deepcopy(prepared.folded)
    report = _new_report(config, prepared)
    calibrated, observed = _calibrate(q, prepared, settings, config, calib_data)
    bias_images = bias_images_for(config, model, prepared.vit)
    fit_on, done = _fit_images(model, prepared, bias_images, report, progress)
    searched = [m for m in used if m.search is not None]
    if searched:
        report.liu = _search(searched[0], prepared, settings, config, calib_data, progress)
        done = 0.9   # of the progress bar: the search is nearly all the work
    _quantize_layers(q, prepared, settings, config, calibrated, report, progress, done)
    _quantize_matmuls(q, prepared, settings, config, observed, report.liu)
    if fit_on is not None:
        report.bias_fit = fit_biases(q, prepared.fit_targets_for(bias_images), fit_on, prepared.activations)
        report.bias_images = bias_images
    if progress is not None:
        progress(1.0, "done")
    result = QuantResult(q, report, prepared.preprocess)
    return _int8_graph(result) if config.int8_graph else result


def _methods_used(settings: dict[str, LayerSettings]) -> list[Method]:
    """The methods of the layers that are quantized, in layer order."""
    return list({s.method: get_method(s.method) for s in settings.values() if not s.skip}.values())


def _check_calibration_data(used: list[Method], calib_data: torch.Tensor | None) -> None:
    needing = sorted(m.name for m in used if m.needs_calibration)
    if needing and calib_data is None:
        raise ConfigError(f"method {needing[0]!r} needs calibration images (calib_data)")


def _prepared_for(model: nn.Module, config: QuantConfig, prepared: Prepared | None,
                  preprocess: Preprocess | None) -> Prepared:
    """`prepared` where it serves `config`, else the model prepared anew."""
    if prepared is not None:
        if prepared.source is not model:
            raise ValueError("`prepared` was made from another model")
        if preprocess is not None and preprocess != prepared.preprocess:
            raise ValueError("`prepared` was made for another preprocess")
        preprocess = prepared.preprocess
    if prepared is None or prepared.key != prepared_key(config):
        prepared = prepare(model, config, preprocess)
    return prepared


def _new_report(config: QuantConfig, prepared: Prepared) -> QuantReport:
    prop = prepared.propagation
    report = QuantReport(config, fallbacks=dict(prop.fallbacks), propagation=prop, prepared=prepared)
    if prepared.bounds_from != "preprocess":
        report.fallbacks["<input>"] = prepared.bounds_from
    return report


def _calibrate(q: nn.Module, prepared: Prepared, settings: dict[str, LayerSettings], config: QuantConfig,
               calib_data: torch.Tensor | None) -> tuple[dict, dict]:
    """The ranges measured on calibration images for the layers whose method asks for them, and
    what was observed at a transformer's matmul operands, whose ranges are taken with theirs."""
    methods = {n: get_method(s.method) for n, s in settings.items() if not s.skip}
    wanted = {n: m.calibration(settings[n].input_bits, settings[n].input_per_channel, config)
              for n, m in methods.items() if m.calibration is not None}
    sites = matmul_sites(prepared.vit) if prepared.vit is not None else {}
    calib_sites = [m for m, n in sites.items() if n in wanted]
    if calib_sites:   # a transformer's matmul operands: observed with its layers, every time
        observed = observe(q, list(wanted) + calib_sites, calib_data[: config.calib_images])
        return {n: calibrated_range(observed[n], *w) for n, w in wanted.items()}, observed
    if wanted:
        return prepared.calibrated_ranges(calib_data, config.calib_images, wanted), {}
    return {}, {}


def _fit_images(model: nn.Module, prepared: Prepared, bias_images: int, report: QuantReport,
                progress: Callable[[float, str], None] | None) -> tuple[torch.Tensor | None, float]:
    """The distilled images the biases are fitted on (None: no fit), and how much of the progress
    bar making them took."""
    if not bias_images:
        return None, 0.0
    if prepared.vit is not None or not has_batchnorm(model):
        report.fallbacks["<bias_images>"] = "no BatchNorm to distill images from: law bias correction only"
        return None, 0.0
    done = 0.0 if prepared.images_ready(bias_images) else 0.9   # distilling is nearly all the work
    return prepared.distilled_images(bias_images, progress), done


def _search(method: Method, prepared: Prepared, settings: dict[str, LayerSettings], config: QuantConfig,
            calib_data: torch.Tensor, progress: Callable[[float, str], None] | None) -> LiuPlan:
    """The whole-model search of `method` over the layers that use it."""
    def bits(name):
        s = settings[name]
        return (s.weight_bits, s.input_bits) if s.method == method.name and not s.skip else None

    sub = (lambda f, what: progress(0.9 * f, what)) if progress is not None else None
    return method.search(prepared.folded, prepared.vit, calib_data[: config.calib_images], bits, config,
                         memo=prepared.ranges, progress=sub)


def _quantize_layers(q: nn.Module, prepared: Prepared, settings: dict[str, LayerSettings], config: QuantConfig,
                     calibrated: dict, report: QuantReport, progress: Callable[[float, str], None] | None,
                     done: float) -> None:
    for i, (name, s) in enumerate(settings.items()):
        if progress is not None:
            progress(done + (1 - done) * i / len(settings), f"quantizing {name}")
        if not s.skip:
            quantize_layer(q, name, s, get_method(s.method), prepared, config, calibrated, report)


def _quantize_matmuls(q: nn.Module, prepared: Prepared, settings: dict[str, LayerSettings], config: QuantConfig,
                      observed: dict, plan: LiuPlan | None) -> None:
    """A transformer's attention matmul operands, each as its block's qkv layer."""
    sites = matmul_sites(prepared.vit) if prepared.vit is not None else {}
    for site, owner in sites.items():
        s = settings[owner]
        quantize_matmul(q.get_submodule(site), site, s, get_method(s.method), prepared, config, observed, plan)


# The int8 graph's simulation is built by spiq.export, a layer above this one: it registers its
# builder here when imported (`import spiq` imports it), so quantize() needs no import of it.
_INT8_GRAPH: list[Callable[[QuantResult], QuantResult]] = []


def register_int8_graph(build: Callable[[QuantResult], QuantResult]) -> None:
    """What QuantConfig(int8_graph=True) applies to the quantized result (raises ConfigError)."""
    _INT8_GRAPH[:] = [build]


def _int8_graph(q: QuantResult) -> QuantResult:
    if not _INT8_GRAPH:
        raise ConfigError("int8_graph needs spiq.export (import spiq)")
    return _INT8_GRAPH[0](q)
