"""Real int8: a quantized model as an ONNX QDQ graph that ONNX Runtime runs on integer kernels.

Integer kernels take one activation scale per tensor (QLinearConv's x_scale is a scalar), so
SPIQ's per-channel input grids cannot be handed to them as they are. They are moved into the
graph instead. A tensor is carried in a transformed domain x'_c = a_c·x_c + b_c in which one
per-tensor QuantizeLinear (S, Z) gives exactly SPIQ's codes round(x_c / s_c) + z_c: a_c = S / s_c
and b_c = (z_c - Z)·S. The producing layer writes x' (its output rows scaled by a_c, its bias
shifted by b_c), the consuming layer reads it (its input columns divided by a_c, the shift
taken out through its bias), and the consumer's int8 weights are then SPIQ's own codes. Both
halves of the affine map are kept: a per-channel zero point is as much a part of SPIQ's grid as
its scale, and moving only the scale would widen every asymmetric channel's range.

Between two layers the map must commute with what sits there. It does with ReLU when b = 0
(post-ReLU grids start at 0, so z = 0), and with ReLU6 too when every channel's range ends at
or below the cap: the quantizer's saturation then does the cap's work. It does with pooling,
flattening and max-pooling. Where it cannot be exact the export does the closest honest thing
and reports it (`ExportReport`):

- a residual stream: an add of two transformed tensors only makes sense in one domain, so
  every tensor joined by adds shares one vector a, while SPIQ chose a grid per consumer. Each
  tensor keeps its own per-tensor scale and its own per-channel zero points, the shared
  per-channel shape is the least-squares fit (in log steps) to SPIQ's steps, ranges stay
  centred where SPIQ put them, and the layers reading those tensors are re-quantized by SPIQ's
  own recipe for the step they actually get (folded weights, SQuant rounding, bias correction)
  - `requantized`;
- the int8 graph quantizes tensors that the simulation keeps in float: a residual branch before
  its add (on the sum's step, centred by the zero points the add implies), the last conv's
  output before the global pool (on the pooled tensor's grid) - `extra_quantizers`;
- an op that does not commute with a per-channel scale (SiLU, Hardswish, GELU...) is followed
  by an explicit per-channel Mul/Add before a per-tensor QuantizeLinear - `mul_layers`. It costs
  15-17 % per conv and keeps the producing conv in float, so it is used only there;
- zero padding inserts x' = 0, which is x = 0 only where b = 0: a padded layer behind a
  per-channel Mul gets an explicit Pad before it; one reading a conv output gets one zero point.

Activations are uint8 with 8-bit grids: ONNX Runtime's integer kernels take uint8 (or int8)
activations and saturate at the container's ends, so a 4-bit grid's clipping has no kernel.
Weights are int8 codes (any width up to 8 bits) with one scale per output channel; biases are
int32 on the accumulator's unit, as QLinearConv requires (a shift of up to half a unit, which
`int8_simulation` models and the float simulation does not).

The int8 graph is exactly a simulated network (`int8_simulation`), but a quantized network's
rounding is chaotic: one code flipped by a last-bit difference flips more codes in the next
layer. On EfficientNet-Lite0 the simulation disagrees with itself run at another batch size
(float summation order) on 0.5 % of top-1s, and ONNX Runtime's exact integer sums, against
float32 convolutions, on about 2 %: top-1 parity with a float simulation has that floor.

The package, in the order the export runs: `support` (what it refuses: ExportError,
check_exportable), `lower` (the fx graph as ops), `grids` (SPIQ's per-layer grids, the domains,
re-quantizing a layer), `scales` (which tensors share a domain and its a, b, S, Z), `plan` (all of
it for one model), `emit` (the ONNX nodes), `report` (ExportReport), `onnx` (export_onnx: plan,
emit, check, write), `twin` (torch models of the written graph; registers the int8-graph builder
with `quantize`), `check` (layer inputs in ONNX Runtime against the simulation), `runtime` (ONNX
Runtime sessions, latency, parity).
"""
from spiq.export.check import layer_sqnr
from spiq.export.onnx import export_onnx
from spiq.export.report import ExportReport
from spiq.export.support import ExportError, check_exportable
from spiq.export.twin import float_twin, int8_simulation, int8_twin

__all__ = ["ExportError", "ExportReport", "check_exportable", "export_onnx", "int8_twin", "float_twin",
           "int8_simulation", "layer_sqnr"]
