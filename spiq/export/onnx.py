"""export_onnx: a quantized model (or a float one) written as an ONNX graph, with its report."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from spiq.export.emit import build_onnx
from spiq.export.plan import plan_export
from spiq.export.report import ExportReport, export_report
from spiq.export.support import NO_VIT, ExportError, check_exportable
from spiq.graph.ops import BATCHNORMS
from spiq.models.vit import is_transformer
from spiq.quantize.report import QuantResult
from spiq.transforms.fold import folded_copy


def export_onnx(qmodel: QuantResult | nn.Module, path: str | os.PathLike, *, quantized: bool = True,
                input_size: int | None = None, batch: int | None = None) -> ExportReport:
    """Write `qmodel` (from spiq.quantize, or a float model) as an ONNX graph; return what was done.

    quantized=True: a QDQ graph with uint8 per-tensor activation quantizers and int8 per-channel
    weights, which ONNX Runtime fuses into QLinearConv/QLinearAdd/QGemm. quantized=False: the same
    graph with every scale folded but no quantizer (the "folded float" model, equal to
    `float_twin(qmodel, report)`). The input is the normalised image (N, 3, H, W), H = W =
    `input_size` (default: the crop of the preprocess quantize() was given, else 224), fixed: padding is static. `batch`
    fixes the batch size (default: symbolic). On any error nothing is written at `path`.
    """
    proto, report = build_export(qmodel, str(path), quantized, input_size, batch)
    _write_atomic(proto, Path(path))
    return report


def build_export(qmodel: QuantResult | nn.Module, path: str, quantized: bool, input_size: int | None,
                 batch: int | None):
    """The ONNX graph of export_onnx() and its report, in memory."""
    import onnx

    if isinstance(qmodel, QuantResult):
        # an int8_graph result simulates its source's graph: the graph written is the source's
        quant = qmodel.source or qmodel
        if quant.report.searched or is_transformer(quant.model):
            raise ExportError(NO_VIT)
        check_exportable(quant.config)
        model, report = quant.model, quant.report
        if input_size is None and quant.preprocess is not None:
            input_size = quant.preprocess.crop
    else:
        if is_transformer(qmodel):
            raise ExportError(NO_VIT)
        model, report = folded_float(qmodel), None
    plan = plan_export(model, _input_shape_of(model, input_size), report)
    proto, extra, plan.probes, plan.q_points = build_onnx(plan, quantized, batch, "spiq")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the generated ONNX graph is invalid: {exc}") from exc
    return proto, export_report(plan, proto, path, quantized, batch, extra)


def folded_float(model: nn.Module) -> nn.Module:
    """A BN-folded copy of the float `model`, as the export lowers it."""
    folded = folded_copy(model)
    if any(isinstance(m, BATCHNORMS) for m in folded.modules()):
        bn = next(n for n, m in folded.named_modules() if isinstance(m, BATCHNORMS))
        raise ExportError(f"cannot export module `{bn}` (BatchNorm not after a conv): not supported by the int8 export")
    return folded


def _input_shape_of(model: nn.Module, input_size: int | None) -> tuple[int, int, int]:
    input_size = input_size or 224
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    channels = first.in_channels if isinstance(first, nn.Conv2d) else 3
    return channels, input_size, input_size


def _write_atomic(proto, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
