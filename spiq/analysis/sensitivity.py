"""Data-free sensitivity: how much logit SQNR each layer costs when only its input (or only its
weights) is quantized, measured on images distilled from the BatchNorm statistics."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from spiq.config import LayerOverride, QuantConfig
from spiq.core.devices import module_device, on_device, resolve_device
from spiq.core.hooks import run_with_hooks
from spiq.core.metrics import sqnr_db, tensor_sqnr_db
from spiq.models.registry import LoadedModel
from spiq.quantize.api import quantize
from spiq.quantize.memo import Memo, quantizable_layers

# A side that is not being probed is kept at this width: the most `QuantConfig` allows, 16 bits
# sits ~90 dB below the signal, so the probe measures the other side alone.
QUIET_BITS = 16
DISTILLED_IMAGES = 8   # what ships with the default model: no distillation, no real image
KINDS = ("input", "weight")


@dataclass
class LayerSensitivity:
    """What quantizing one layer alone costs at the logits, by width (dB; higher: less sensitive)."""
    name: str
    input_values: int          # the layer's input values per image
    weights: int               # its weight count
    input_share: float         # of the model's quantized input values per image
    weight_share: float        # of the model's quantized weights
    input_sqnr: dict[int, float] = field(default_factory=dict)    # only this layer's input at that width
    weight_sqnr: dict[int, float] = field(default_factory=dict)   # only its weights at that width

    def noise(self, kind: str, bits: int) -> float:
        """The logit error power relative to the signal: 10^(-SQNR/10), what the advisor adds up."""
        return 10 ** (-(self.input_sqnr if kind == "input" else self.weight_sqnr)[bits] / 10)


def probe_config(config: QuantConfig, names: list[str], kind: str, bits: int) -> QuantConfig:
    """`config` with every one of `names` at `bits` on one side and QUIET_BITS on the other, and
    no bias fit: quantized alone (the others skipped), a layer of this config is what a probe runs.
    The weight side is probed behind a dynamic input, so without the per-channel input scales SPIQ
    folds into the weights (their cost shows in the input side's weights at QUIET_BITS only)."""
    ov = {}
    for n in names:
        base = config.overrides.get(n, LayerOverride())
        if kind == "input":
            ov[n] = replace(base, input_bits=bits, weight_bits=QUIET_BITS)
        else:   # a dynamic 16-bit input: no range to search (a minute per width on two cores), no error
            ov[n] = replace(base, weight_bits=bits, input_bits=QUIET_BITS, method="dynamic-tensor",
                            input_granularity=None)
    return config.replace(overrides=ov, bias_images=0, int8_graph=False)


def probed_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """The quantizable layers `config` quantizes (not skipped), in network order."""
    return [n for n in quantizable_layers(model) if not config.for_layer(n).skip]


@torch.no_grad()
def sensitivity(model: nn.Module | LoadedModel, config: QuantConfig, widths=(4, 5, 6, 8),
                images: torch.Tensor | None = None, memo: Memo | None = None,
                progress: Callable[[float, str], None] | None = None, lock=None, device=None) -> list[LayerSensitivity]:
    """Per quantizable layer, the logit SQNR on `images` (default: the distilled ones) when only
    its input, or only its weights, is quantized at each of `widths` (weights also at
    `config.weight_bits`), ranked most sensitive input first.

    Exact per layer at the lowest width: the layer quantized as quantize() does it with every
    other layer skipped and no bias fit, the rest of the network float. The other widths scale
    that logit error by the layer's own output error at each width over the lowest, measured on the
    same images (small errors travel to the logits linearly): one network pass per layer and side
    instead of one per width. No real image is read unless `images` are real.

    `lock` is held whenever the shared `model` or `memo` is used (quantizing, copying the
    float model, the reference logits); the probes run on private copies without it.

    Quantizing runs where quantize() does, on the CPU; the probes, the reference logits and the
    images run on `device` (cpu, cuda, auto; default: where the model is).
    """
    widths = sorted(set(widths))
    loaded_model = model.model if isinstance(model, LoadedModel) else model
    lock = lock or contextlib.nullcontext()
    device = module_device(loaded_model) if device is None else resolve_device(device)
    with lock:
        memo = memo or Memo(model)
        images = (memo.distilled_images(DISTILLED_IMAGES) if images is None else images).to(device)
    names = probed_layers(loaded_model, config)
    sides = {"input": widths, "weight": sorted(set(widths) | {config.weight_bits})}
    say = progress or (lambda f, m: None)
    quantized = {}   # (kind, bits) -> the model with every probed layer quantized so
    steps = sum(len(b) for b in sides.values())
    for kind, bits in ((k, b) for k, bs in sides.items() for b in bs):
        say(0.3 * len(quantized) / steps, f"quantizing {kind}s at {bits} bits")
        with lock:
            probe = quantize(model, probe_config(config, names, kind, bits), memo=memo).model
        quantized[kind, bits] = on_device(probe, device)
    with lock:
        work = copy.deepcopy(memo.reference(config).folded).to(device)   # float; one quantized layer swapped in at a time
        reference = on_device(loaded_model, device)(images)
    own, sizes = _own_errors(work, quantized, names, images)
    probed = {}
    for i, (name, kind) in enumerate((n, k) for n in names for k in KINDS):
        say(0.3 + 0.7 * i / (2 * len(names)), f"probing {name} ({kind})")
        probed[name, kind] = _probe(work, name, quantized[kind, sides[kind][0]].get_submodule(name), images, reference)
    total_in = sum(s[0] for s in sizes.values())
    total_w = sum(s[1] for s in sizes.values())
    rows = []
    for n in names:
        row = LayerSensitivity(n, sizes[n][0], sizes[n][1], sizes[n][0] / total_in, sizes[n][1] / total_w)
        for kind, target in (("input", row.input_sqnr), ("weight", row.weight_sqnr)):
            lowest = own[n][kind, sides[kind][0]]
            for b in sides[kind]:
                # the probe's logit SQNR, moved by what the layer's own SQNR gains over the lowest width
                target[b] = probed[n, kind] + (own[n][kind, b] - lowest) if math.isfinite(lowest) else probed[n, kind]
        rows.append(row)
    say(1.0, "done")
    return sorted(rows, key=lambda r: r.input_sqnr[widths[0]])


def _probe(work: nn.Module, name: str, layer: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Logit SQNR of `work` with `layer` in place of its float `name`, the rest float."""
    float_layer = work.get_submodule(name)
    work.set_submodule(name, layer)
    try:
        return tensor_sqnr_db(reference, work(images))
    finally:
        work.set_submodule(name, float_layer)


def _own_errors(work: nn.Module, quantized: dict, names: list[str], images: torch.Tensor):
    """Per layer, its own output SQNR (dB) for each (side, width) on its float input, and its
    (input values per image, weight count)."""
    energy = {n: {key: [0.0, 0.0] for key in quantized} for n in names}
    sizes = {}

    def hook(name):
        def fn(layer, args, y):
            x = args[0]
            sizes[name] = (x[0].numel(), layer.weight.numel())
            signal = float((y.double() ** 2).sum())
            for key, q in quantized.items():
                e = energy[name][key]
                e[0] += signal
                e[1] += float(((q.get_submodule(name)(x).double() - y.double()) ** 2).sum())
        return fn

    run_with_hooks(work, {n: hook(n) for n in names}, images, batch=len(images))
    return {n: {k: sqnr_db(*e) for k, e in energy[n].items()} for n in names}, sizes


def predicted_sqnr_db(noise: float) -> float:
    """The logit SQNR of a model whose layers' errors add up to `noise` (relative power)."""
    return math.inf if noise <= 0 else -10 * math.log10(noise)

