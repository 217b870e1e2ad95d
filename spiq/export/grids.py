"""The grids of the int8 graph: SPIQ's per-channel input grid of each conv/linear, the transformed
domains tensors are carried in, each layer's plan, and re-quantizing a layer for the grid it gets."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spiq.core.quant import Grid, InputQuant, QuantLayer, channel_axis
from spiq.core.tensors import Range, broadcast_input, per_input_channel
from spiq.export.lower import Op
from spiq.export.support import ExportError
from spiq.graph.ops import SAME_PADDED, layer_of
from spiq.methods.layerwise import bias_shift, input_quant, layer_weights, weight_spec
from spiq.methods.plans import LayerPlan
from spiq.quantize.report import QuantPlan
from spiq.ranges.laws import law_moments, range_effect, unknown_input_dist

QMAX = Grid.UNSIGNED.levels(8)[1]   # uint8 activations: 255
DEAD = 1e-6               # a channel whose step is this small against the widest is dead (its range is {0})


@dataclass
class Grid:
    """A per-channel uint8 grid: x ≈ (code - zero)·step, codes 0..255. Dead channels (range {0},
    their weights all zero) get a neutral step and take no part in any fit."""
    step: torch.Tensor          # (C,) float64
    zero: torch.Tensor          # (C,) float64, integers
    live: torch.Tensor          # (C,) bool

    @property
    def lo(self):
        return -self.zero * self.step

    @property
    def hi(self):
        return (QMAX - self.zero) * self.step


def per_channel(v: torch.Tensor, channels: int) -> torch.Tensor:
    v = v.detach().double().reshape(-1)
    return v.expand(channels).clone() if v.numel() == 1 else v.clone()


def _input_columns_zero(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Per input channel: True where every weight reading it is zero."""
    return per_input_channel(codes.abs().double(), groups) == 0


def _spiq_grid(decided: LayerPlan, groups: int, channels: int) -> Grid:
    q = decided.input_quant
    step, zero = per_channel(q.scale, channels), per_channel(q.zero, channels)
    dead = (step < DEAD * step.max()) & _input_columns_zero(decided.weight_codes, groups)
    live = ~dead
    if dead.any():
        step[dead] = step[live].median() if live.any() else 1.0
        zero[dead] = 0.0
    return Grid(step, zero, live)


def same_grid(g: Grid, h: Grid) -> bool:
    m = g.live & h.live
    return bool(torch.equal(g.live, h.live) and torch.allclose(g.step[m], h.step[m], rtol=1e-6, atol=0)
                and torch.equal(g.zero[m], h.zero[m]))


def neutral_dead(g: Grid) -> None:
    """Give the dead channels of `g` the median live step and zero point 0, in place."""
    if (~g.live).any():
        g.step[~g.live] = g.step[g.live].median() if g.live.any() else 1.0
        g.zero[~g.live] = 0.0


@dataclass
class Enc:
    """Tensors that share one transformed domain x' = a·x + b and one per-tensor quantizer (S, Z).

    A layer, an add, an activation or the graph input creates one; ReLU, pooling and flattening
    leave their input's. `fixed` domains stay in the original units (a = 1, b = 0): the graph
    input, the output, and both sides of an op that does not commute with a per-channel scale."""
    id: int
    root: Op
    channels: int
    fixed: bool = False
    relu: bool = False                       # a ReLU reads it: b must be 0
    padded: bool = False                     # a padded layer reads it: b must be 0
    targets: list[str] = field(default_factory=list)   # int8 layers reading it
    group: int = -1
    convert_for: str = ""                    # an explicit Mul/Add domain made for this one layer
    # decided by the plan
    a: torch.Tensor | None = None            # (C,)
    b: torch.Tensor | None = None            # (C,), in transformed units
    S: float = 1.0
    Z: int = 0
    quantized: bool = False
    grid: Grid | None = None                 # the effective grid (original units) when quantized
    unified: bool = False                    # per-channel zero points were made one (padding)

    def identity(self) -> None:
        self.a = torch.ones(self.channels, dtype=torch.float64)
        self.b = torch.zeros(self.channels, dtype=torch.float64)

    @property
    def has_mul(self) -> bool:
        """Whether an explicit conversion into this domain does anything (a Mul or an Add)."""
        return bool((self.a != 1).any() or (self.b != 0).any())


@dataclass
class Int8Layer:
    """What one conv/linear computes, in original units: y = Σ weight·x̂ + bias, where x̂ is the
    input on `grid` (int8 layers: weight = codes·wscale / step, per output and input channel)."""
    name: str
    op: Op
    int8: bool
    weight: torch.Tensor                      # float64, original domain
    bias: torch.Tensor                        # float64 (O,)
    codes: torch.Tensor | None = None         # integer-valued
    wscale: torch.Tensor | None = None        # (O,) float64: codes·wscale = weight · step (per input channel)
    grid: Grid | None = None
    spiq_grid: Grid | None = None
    requantized: bool = False
    input_quant: InputQuant | None = None     # for the torch twin
    # what the int8 graph really holds, in original units: the bias rounded to the int32
    # accumulator unit, the weights without the filters kept as their bias only
    int8_weight: torch.Tensor | None = None
    int8_bias: torch.Tensor | None = None
    enc_in: Enc | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    explicit_pad: bool = False                # padded by a Pad op in front (original units)


def _pads(op: Op, shape_in: tuple) -> tuple[int, int, int, int]:
    m = layer_of(op.module)
    if not isinstance(m, nn.Conv2d):
        return 0, 0, 0, 0
    if isinstance(m, SAME_PADDED):   # timm's TF "same": computed per input size; static here
        from timm.layers.padding import get_same_padding

        ph = get_same_padding(shape_in[2], m.kernel_size[0], m.stride[0], m.dilation[0])
        pw = get_same_padding(shape_in[3], m.kernel_size[1], m.stride[1], m.dilation[1])
        return ph // 2, pw // 2, ph - ph // 2, pw - pw // 2
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return 0, 0, 0, 0
        tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2
    ph, pw = m.padding
    return ph, pw, ph, pw


def int8_layer(op: Op, shape_in: tuple, decided: LayerPlan | None) -> Int8Layer:
    """A layer's int8 form on SPIQ's own grid, from what quantization `decided` for it (None: the
    layer is float); ExportError where its quantization has no int8 form."""
    mod = op.module
    inner = layer_of(mod)
    bias = inner.bias.detach().double() if inner.bias is not None else torch.zeros(inner.weight.shape[0], dtype=torch.float64)
    plan = Int8Layer(op.target, op, False, inner.weight.detach().double(), bias.clone(), pads=_pads(op, shape_in))
    if decided is None:
        if isinstance(mod, QuantLayer) and mod.input_quant is not None:
            raise ExportError(f"layer {op.target} is quantized but the plan has no entry for it: export the "
                              "result of spiq.quantize as it is")
        return plan
    q = decided.input_quant
    if q.mode != "static":
        raise ExportError(f"layer {op.target}: {q.mode} input quantization has no static int8 graph; "
                          "export a static method (spiq, static-tensor, calib-*)")
    if q.bits != 8:
        raise ExportError(f"layer {op.target}: {q.bits}-bit inputs; the int8 export needs 8-bit inputs "
                          "(ONNX Runtime's integer kernels take uint8 activations and saturate at 255, so a "
                          f"{q.bits}-bit grid's clipping has no kernel)")
    codes = decided.weight_codes
    if float(codes.abs().max()) > 127:
        raise ExportError(f"layer {op.target}: weight codes exceed int8 (more than 8-bit weights)")
    groups = getattr(inner, "groups", 1)
    grid = _spiq_grid(decided, groups, shape_in[1])
    ws = per_channel(decided.weight_scale, inner.weight.shape[0])
    # codes·wscale is the weight times the input step: folded layers hold exactly that; a
    # per-tensor input multiplies its one step in.
    wscale = ws if decided.folded else ws * grid.step[0]
    check = codes.double() * out_view(wscale, inner.weight)
    expect = plan.weight * broadcast_input(grid.step, plan.weight, groups)
    if not torch.allclose(check, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max())):
        raise ExportError(f"layer {op.target}: its weights are not its integer codes times its scales")
    plan.int8, plan.codes, plan.wscale, plan.grid, plan.spiq_grid = True, codes.double(), wscale, grid, grid
    plan.input_quant = q
    return plan


def out_view(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to multiply the weight `w`."""
    return v.view((-1,) + (1,) * (w.dim() - 1))


def requantize(report: QuantPlan | None, lp: Int8Layer, grid: Grid) -> None:
    """Quantize layer `lp` again, by the recipe quantize() used (`report`), for the input grid it really gets."""
    reference = report.reference if report is not None else None
    if reference is None:
        raise ExportError(f"layer {lp.name}: its input grid must change for the int8 graph and the model "
                          "carries no float reference to re-quantize it from (quantize it with spiq.quantize)")
    config = report.config
    s = config.for_layer(lp.name)
    ref = reference.get_submodule(lp.name)
    rng = Range(grid.lo.float(), grid.hi.float())
    inq = input_quant(rng, 8, True, channel_axis(ref))
    codes, w_scale, w_sim = layer_weights(ref, inq, weight_spec(s, config))
    bias = ref.bias.detach().clone() if ref.bias is not None else torch.zeros(w_sim.shape[0])
    if config.bias_correction:
        dist = report.propagation.inputs.get(lp.name) if report.propagation is not None else None
        dist = dist or unknown_input_dist(grid.step.numel(), config.tail)
        bias = bias - bias_shift(ref, ref.weight.detach(), w_sim, law_moments(dist)[0], range_effect(dist, rng, 8).mean_q)
    if lp.name in report.bias_fit:
        # what bias_images fitted is mostly the mean error the layers before left, which does not
        # depend on the grid this layer reads
        bias = bias - report.bias_fit[lp.name]
    step, zero = per_channel(inq.scale, grid.step.numel()), per_channel(inq.zero, grid.step.numel())
    lp.grid = Grid(step, zero, grid.live.clone())
    lp.codes, lp.wscale = codes.double(), per_channel(w_scale, w_sim.shape[0])
    lp.weight, lp.bias = w_sim.double(), bias.double()
    lp.input_quant, lp.requantized = inq, True
