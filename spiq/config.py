"""One configuration object for every method, with validation and a flat JSON form."""
from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace

from spiq.core.errors import SpiqError

GRANULARITIES = ("channel", "tensor")
# Tail laws of BN-implied pre-activations (spiq.ranges): Gaussian, Laplace, Student t with k dof.
TAIL_MODELS = ("gauss", "laplace", "t3", "t4", "t6", "t8", "t10")
AUTO_BIAS_IMAGES = 8   # bias_images=None on a model with BatchNorm; 16 add 0.05-0.2 dB for twice the distillation
MIN_BITS, MAX_BITS = 2, 16
# A recipe is a flat object with per-layer overrides: depth 3. The bounds refuse a hostile file
# before the parser recurses into it (200k nested brackets overflow Python's stack).
MAX_JSON_BYTES = 1_000_000
MAX_JSON_DEPTH = 8
CONFIG_VERSION = 1   # of the recipe's JSON form; from_dict reads a recipe without it as this version
_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


class ConfigError(SpiqError, ValueError):
    """A configuration field is missing, unknown, or out of range."""


# The methods live in spiq.methods, a layer above, which registers them here when it is imported
# (`import spiq` imports it): QuantConfig checks names, defaults and each method's own options
# through them without importing that layer.
_REGISTERED: dict = {"methods": {}, "validate": None}


def use_methods(methods: dict, validate: Callable[[QuantConfig], None]) -> None:
    """Read the methods from `methods` (name -> spiq.methods Method, filled as they register) and
    check every config with `validate` (spiq.methods.registry.validate)."""
    _REGISTERED["methods"], _REGISTERED["validate"] = methods, validate


def _methods() -> dict:
    if not _REGISTERED["methods"]:
        raise ConfigError("no quantization method is registered: import spiq (spiq.methods registers them)")
    return _REGISTERED["methods"]


class MethodDescriptions(Mapping):
    """name -> description of every registered method, in the order they registered (the app's)."""

    def __getitem__(self, name: str) -> str:
        return _methods()[name].description

    def __iter__(self):
        return iter(_methods())

    def __len__(self) -> int:
        return len(_methods())

    def __repr__(self) -> str:
        return repr(dict(self))


METHODS = MethodDescriptions()


def read_recipe_text(path, what: str) -> str:
    """The text of a recipe file (`what` names it in errors): at most MAX_JSON_BYTES, read as UTF-8."""
    try:
        with open(path, "rb") as f:
            if (size := os.fstat(f.fileno()).st_size) > MAX_JSON_BYTES:
                raise ConfigError(f"{what} has {size} bytes; a recipe is a small JSON file (at most 1 MB)")
            data = f.read(MAX_JSON_BYTES + 1)   # a device or pipe has no size to check beforehand
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > MAX_JSON_BYTES:
        raise ConfigError(f"{what} has more than 1 MB; a recipe is a small JSON file")
    try:
        return data.decode("utf-8-sig")   # -sig: a byte-order mark as some editors write it
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings, without parsing."""
    depth = deepest = 0
    for ch in _JSON_STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


class _HugeNumber(float):
    """An integer of more digits than any field takes: infinite, so every range check refuses it,
    and named by its length (Python refuses to convert past 4,300 digits, naming no field)."""

    def __new__(cls, text: str):
        number = super().__new__(cls, "-inf" if text.startswith("-") else "inf")
        number.digits = len(text.lstrip("-"))
        return number

    def __repr__(self) -> str:
        return f"a {self.digits}-digit number"


def _bounded_int(text: str):
    return int(text) if len(text) <= 40 else _HugeNumber(text)


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _check_bits(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{where} must be an integer from {MIN_BITS} to {MAX_BITS}, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{where} must be from {MIN_BITS} to {MAX_BITS}, got {value}")
    return value


def check_choice(where: str, value, options) -> str:
    if value not in options:
        raise ConfigError(f"{where} must be one of {', '.join(options)}; got {value!r}{suggest(value, options)}")
    return value


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exceptions to the model-wide settings; None means 'as the model'."""
    skip: bool = False
    method: str | None = None
    weight_bits: int | None = None
    input_bits: int | None = None
    input_granularity: str | None = None
    weight_granularity: str | None = None


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model. The fields that belong to one method are checked by that method's
    module in spiq.methods, whatever method the config names: a recipe keeps them when its method
    changes."""
    method: str = "spiq"
    weight_bits: int = 8
    input_bits: int = 8
    # None: the method's own (per channel for spiq and dynamic-channel, per tensor otherwise).
    input_granularity: str | None = None
    weight_granularity: str = "channel"
    # Weight clipping: "max" (round to nearest over the full range) or "mse" (per-channel search).
    weight_clip: str = "max"
    # Weight rounding: "nearest", or "squant" (data-free flips that cancel kernel/channel error sums).
    weight_rounding: str = "squant"
    # Tail law of BN-implied pre-activations for the data-free methods. Pointwise convs' BN outputs
    # and the residual stream measure near-Gaussian (largest of 3e5 values 5-7 sigma), yet clipping
    # their rare outliers costs the logits more than rounding does: of t4, t8, t10 and Gaussian,
    # t8 gave the best logit SQNR (t4 put 8-bit ranges at 10-20 sigma; Gaussian clipped too much).
    tail: str = "t8"
    # ... and of depthwise-conv outputs, whose real tails reach 20-60 sigma (None: same as tail).
    tail_depthwise: str | None = "t3"
    # ... and of residual sums (None: same as tail).
    tail_sum: str | None = "t8"
    # SPIQ folding: "always" (every layer per input channel, as in the paper) or "auto" (per layer,
    # per channel only where the expected input gain beats the weight precision the fold costs).
    fold: str = "auto"
    # Data-free range rule: "mse" (expected clip + rounding error at the bit width) or the naive
    # "sigma" rule, mean ± n_sigma·std through the activation, kept to show why it loses.
    range_rule: str = "mse"
    n_sigma: float = 4.0
    # Weight of the clipping term against rounding when a data-free range is chosen.
    clip_penalty: float = 1.0
    # Subtract the expected output error (from the BN-implied input law) from each layer's bias.
    bias_correction: bool = True
    # Then fit each activated layer's bias, in order, so that the per-channel mean of its activated
    # output matches the float model's on this many images distilled from the BN statistics
    # (spiq.quantize.distill: data-free, cached on disk per model; the default model's ship with the package).
    # It removes the mean error that accumulates from the layers before, which the per-layer law
    # cannot see: +0.2 to +1.4 dB logit SQNR on EfficientNet-Lite0, for every method. None: 8 on a
    # model with BatchNorm, 0 on one without; 0: off.
    bias_images: int | None = None
    # Cross-layer equalization (DFQ) of layer pairs joined by ReLU/ReLU6 before quantizing: helps
    # per-tensor weights and per-tensor activations; a no-op for per-channel weights on per-channel
    # folded inputs (SPIQ), whose integer codes do not depend on a channel's scale.
    equalize: bool = False
    # Simulate the int8 graph the ONNX export writes instead of SPIQ's own grids: integer adds need
    # one per-channel scale shape along each residual stream (the layers reading it re-quantized
    # for it), and quantize the residual branches and sums (export.int8_twin). Static methods,
    # 8-bit inputs, weights up to 8 bits.
    int8_graph: bool = False
    # calib-*: the percentile of calib-percentile, and how many calibration images (liu-ptq's too).
    percentile: float = 99.99
    calib_images: int = 32
    # liu-ptq: candidates per interval search and alternating rounds (the paper's), tokens per image
    # the search runs on, and the ranking term on attention scores (weight γ, margin θ, key pairs
    # compared per query row).
    search_points: int = 100
    search_rounds: int = 20
    search_tokens: int = 64
    rank_weight: float = 0.1
    rank_margin: float = 0.2
    rank_pairs: int = 64
    # liu-ptq on transformers: average bits over the attention and MLP modules' weights, one width
    # per module (weights and inputs) chosen by nuclear norm × output error; None: uniform bits.
    mixed_precision: float | None = None
    overrides: dict[str, LayerOverride] = field(default_factory=dict)

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        object.__setattr__(self, "weight_bits", _check_bits("weight_bits", self.weight_bits))
        object.__setattr__(self, "input_bits", _check_bits("input_bits", self.input_bits))
        if self.input_granularity is not None:
            check_choice("input_granularity", self.input_granularity, GRANULARITIES)
        check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        check_choice("weight_clip", self.weight_clip, ("max", "mse"))
        check_choice("weight_rounding", self.weight_rounding, ("nearest", "squant"))
        check_choice("tail", self.tail, TAIL_MODELS)
        for name in ("tail_depthwise", "tail_sum"):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), TAIL_MODELS)
        for name in ("bias_correction", "equalize", "int8_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bias_images is not None and (isinstance(self.bias_images, bool) or not isinstance(self.bias_images, int)
                                             or not 0 <= self.bias_images <= 256):
            raise ConfigError(f"bias_images must be an integer from 0 to 256 (or null: automatic), got {self.bias_images!r}")
        # the options that belong to one method, each checked by its method (spiq.methods)
        _REGISTERED["validate"](self)
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides must map layer names to settings")
        clean = {}
        for name, ov in self.overrides.items():
            if isinstance(ov, LayerOverride):
                ov = asdict(ov)
            if isinstance(ov, dict):
                ov = _override_from_dict(name, ov)
            else:
                raise ConfigError(f"overrides[{name!r}] must be an object, got {type(ov).__name__}")
            clean[name] = ov
        object.__setattr__(self, "overrides", clean)

    # --- what a layer gets -----------------------------------------------------------------------
    def for_layer(self, name: str) -> "LayerSettings":
        ov = self.overrides.get(name, LayerOverride())
        method = ov.method or self.method
        gran = ov.input_granularity or (self.input_granularity if ov.method is None else None) \
            or default_granularity(method)
        return LayerSettings(
            skip=ov.skip, method=method,
            weight_bits=ov.weight_bits or self.weight_bits,
            input_bits=ov.input_bits or self.input_bits,
            input_per_channel=gran == "channel",
            weight_per_channel=(ov.weight_granularity or self.weight_granularity) == "channel",
        )

    @property
    def needs_calibration(self) -> bool:
        """Whether some layer's method reads calibration images."""
        return any(_methods()[m].needs_calibration for m in self.methods_named())

    def methods_named(self) -> list[str]:
        """The methods the config names, model-wide and in its overrides (skipped layers' included)."""
        return list(dict.fromkeys([self.method, *(o.method for o in self.overrides.values() if o.method)]))

    def check_layers(self, layer_names) -> None:
        """Raise if an override names a layer the model does not have."""
        names = list(layer_names)
        for name in self.overrides:
            if name not in names:
                raise ConfigError(f"overrides: the model has no quantizable layer {name!r}{suggest(name, names)}")

    # --- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"version": CONFIG_VERSION, "method": self.method, "weight_bits": self.weight_bits,
               "input_bits": self.input_bits}
        default = QuantConfig()
        for f in fields(self):
            if f.name in out or f.name == "overrides":
                continue
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out[f.name] = value
        if self.overrides:
            out["overrides"] = {n: {k: v for k, v in asdict(ov).items() if v not in (None, False)}
                                for n, ov in self.overrides.items()}
        return out

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version != CONFIG_VERSION:
            raise ConfigError(f"version: this spiq reads recipes of version {CONFIG_VERSION}, got {version!r}")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown config field {key!r}{suggest(key, known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        if not isinstance(text, str):
            raise ConfigError(f"a config is JSON text, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise ConfigError(f"a config is a small JSON text; this one has {len(text)} characters "
                              f"(the limit is {MAX_JSON_BYTES})")
        if _json_depth(text) > MAX_JSON_DEPTH:
            raise ConfigError(f"config is nested more than {MAX_JSON_DEPTH} levels deep; a recipe needs 3")
        try:
            data = json.loads(text, parse_int=_bounded_int)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "QuantConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class LayerSettings:
    skip: bool
    method: str
    weight_bits: int
    input_bits: int
    input_per_channel: bool
    weight_per_channel: bool


def default_granularity(method: str) -> str:
    """The input granularity `method` gets where the config leaves it open."""
    return _methods()[method].input_granularity


def _override_from_dict(layer: str, data: dict) -> LayerOverride:
    known = {f.name for f in fields(LayerOverride)}
    for key in data:
        if key not in known:
            raise ConfigError(f"overrides[{layer!r}]: unknown field {key!r}{suggest(key, known)}")
    where = f"overrides[{layer!r}]"
    if "skip" in data and not isinstance(data["skip"], bool):
        raise ConfigError(f"{where}.skip must be true or false, got {data['skip']!r}")
    if data.get("method") is not None:
        check_choice(f"{where}.method", data["method"], METHODS)
    for b in ("weight_bits", "input_bits"):
        if data.get(b) is not None:
            data = {**data, b: _check_bits(f"{where}.{b}", data[b])}
    for g in ("input_granularity", "weight_granularity"):
        if data.get(g) is not None:
            check_choice(f"{where}.{g}", data[g], GRANULARITIES)
    return LayerOverride(**data)
