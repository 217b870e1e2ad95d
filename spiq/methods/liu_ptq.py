"""The liu-ptq method: its options, and its handler, which searches the whole transformer once
(spiq.methods.liu) and plans each layer and attention matmul operand with the intervals found."""
from __future__ import annotations

import torch

from spiq.config import MAX_BITS, MIN_BITS, ConfigError, QuantConfig
from spiq.core.quant import Grid, InputQuant, channel_axis
from spiq.core.tensors import Range
from spiq.methods.liu import LiuPlan, LiuSettings, Site, collect, plan
from spiq.methods.liu_intervals import input_quant
from spiq.methods.plans import LayerPlan, MethodPlan, PlanContext
from spiq.methods.registry import Method, register
from spiq.models.vit import matmul_sites

NAME = "liu-ptq"
SEARCH_OPTIONS = ("search_points", "search_rounds", "search_tokens", "rank_pairs")
OPTIONS = SEARCH_OPTIONS + ("rank_weight", "rank_margin", "mixed_precision", "calib_images")


def validate(config: QuantConfig) -> None:
    """The search's settings, and mixed precision, which only liu-ptq has."""
    for name in SEARCH_OPTIONS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, top in (("rank_weight", 100.0), ("rank_margin", 1000.0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise ConfigError(f"{name} must be a number from 0 to {top:g}, got {value!r}")
    mp = config.mixed_precision
    if mp is not None:
        if isinstance(mp, bool) or not isinstance(mp, (int, float)) or not MIN_BITS <= mp <= MAX_BITS:
            raise ConfigError(f"mixed_precision must be average bits from {MIN_BITS} to {MAX_BITS}, got {mp!r}")
        if config.method != NAME:
            raise ConfigError(f"mixed_precision is part of method {NAME!r}, not {config.method!r}")


def search(ctx: PlanContext, method: Method) -> LiuPlan:
    """The intervals of every site of the layers `method` quantizes, searched on the calibration images."""
    config = ctx.config

    def bits(name):
        s = ctx.settings[name]
        return (s.weight_bits, s.input_bits) if s.method == method.name and not s.skip else None

    calib = collect(ctx.reference, ctx.vit, ctx.calib_data[: config.calib_images], config.search_tokens)
    settings = LiuSettings(config.search_points, config.search_rounds, config.rank_weight, config.rank_margin,
                           config.rank_pairs, config.bias_correction)
    return plan(ctx.reference, ctx.vit, calib, bits, settings, config.mixed_precision, memo=ctx.memo,
                progress=ctx.progress)


def _layer_plan(ctx: PlanContext, name: str, site: Site) -> LayerPlan:
    """A layer quantized with the intervals searched for it, its bias shift included."""
    layer = ctx.reference.get_submodule(name)
    codes, w_scale = site.weight_codes(layer.weight.detach())
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if site.bias_shift is not None:
        bias = (bias if bias is not None else codes.new_zeros(codes.shape[0])) + site.bias_shift
    inq = input_quant(site.search.delta_a, site.kind_a, site.bits_a, channel_axis(layer))
    lo, hi = Grid(site.kind_a).levels(site.bits_a)
    rng = Range(torch.tensor(lo * site.search.delta_a), torch.tensor(hi * site.search.delta_a))
    return LayerPlan(name, NAME, site.bits_a, site.bits_b, inq, rng, codes, w_scale, codes * w_scale, bias, False,
                     "calibration", (f"intervals searched on {ctx.config.calib_images} calibration images",))


def _matmul_quant(found: LiuPlan, site: str) -> InputQuant:
    """One attention matmul operand's searched interval: q and p are the first operands."""
    attn, operand = site.rsplit(".", 1)
    searched = found.matmuls[f"{attn}.qk" if operand in ("q_in", "k_in") else f"{attn}.pv"]
    first = operand in ("q_in", "p_in")
    delta = searched.search.delta_a if first else searched.search.delta_b
    kind = searched.kind_a if first else searched.kind_b
    return input_quant(delta, kind, searched.bits_a if first else searched.bits_b)


def plan_layers(ctx: PlanContext, method: Method) -> MethodPlan:
    found = search(ctx, method)
    layers = {name: _layer_plan(ctx, name, site) for name, site in found.layers.items()}
    matmuls = {site: _matmul_quant(found, site) for site, owner in matmul_sites(ctx.vit).items() if owner in layers}
    return MethodPlan(layers, matmuls, found)


LIU_PTQ = register(Method(
    NAME, "vision transformers (Liu et al. 2021): per-tensor intervals searched for output similarity "
          "on calibration images, ranking loss on attention, bias correction",
    needs_calibration=True, transformer_only=True, options=OPTIONS, plan=plan_layers, validate=validate))
