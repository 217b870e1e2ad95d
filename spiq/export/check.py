"""The int8 graph's layer inputs as ONNX Runtime computes them, against the simulation's."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from spiq.core.hooks import forward_hooks
from spiq.core.metrics import sqnr_db
from spiq.core.quant import fake_quant_input
from spiq.export.grids import Enc
from spiq.export.report import ExportReport
from spiq.export.runtime import ort_session
from spiq.quantize.report import QuantResult, module_of


@torch.no_grad()
def layer_sqnr(qmodel: QuantResult | nn.Module, report: ExportReport, images: torch.Tensor,
               batch: int = 16) -> list[dict]:
    """Per int8 layer: SQNR (dB) of its quantized input as ONNX Runtime computes it, against the
    simulation's fake-quantized input (the signal). The real input is read from the uint8 codes of
    its QuantizeLinear and mapped back to original units."""
    plan = report.plan
    if not report.quantized:
        raise ValueError("layer_sqnr needs the int8 graph (export_onnx(..., quantized=True))")
    names = dict(plan.probes)
    sig, err = Counter(), Counter()
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            captured[name] = fake_quant_input(args[0], mod.input_quant)
        return fn

    hooks = forward_hooks(module_of(qmodel), {n: hook(n) for n in names}, pre=True)
    with tempfile.TemporaryDirectory() as d, hooks:
        session = ort_session(_with_probe_outputs(report.path, names.values(), Path(d) / "probe.onnx"))
        outputs = [o.name for o in session.get_outputs()]
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            res = dict(zip(outputs, session.run(None, {"input": x.numpy()})))
            captured.clear()
            qmodel(x)
            for layer, q in names.items():
                real = _decode(torch.from_numpy(res[q]), plan.layers[layer].enc_in)
                sim = captured[layer]
                sig[layer] += float((sim.double() ** 2).sum())
                err[layer] += float(((sim.double() - real) ** 2).sum())
    rows = []
    for layer in names:
        lp = plan.layers[layer]
        rows.append({"layer": layer, "sqnr_db": sqnr_db(sig[layer], err[layer]),
                     "requantized": lp.requantized, "mul": bool(lp.enc_in.convert_for and lp.enc_in.has_mul)})
    return rows


def _with_probe_outputs(path: str, probes, out: Path) -> Path:
    """A copy of the ONNX graph at `path`, at `out`, that also outputs the tensors named `probes`."""
    import onnx

    model = onnx.load(path)
    have = {o.name for o in model.graph.output}
    for q in probes:
        if q not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(q, onnx.TensorProto.UINT8, None))
            have.add(q)
    onnx.save(model, str(out))
    return out


def _decode(codes: torch.Tensor, e: Enc) -> torch.Tensor:
    shape = (1, -1) + (1,) * (codes.dim() - 2)
    x_t = (codes.double() - e.Z) * e.S
    return (x_t - e.b.view(shape)) / e.a.view(shape)
