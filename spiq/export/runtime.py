"""Running ONNX models: ONNX Runtime sessions, latency, parity with the simulation, ORT's own
int8 quantizers as baselines, and what the CPU offers integer kernels."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spiq.core.metrics import tensor_sqnr_db
from spiq.quantize.report import QuantResult


# --- running it: ONNX Runtime sessions, latency, parity with the simulation ----------------------

def ort_session(path: str | os.PathLike, threads: int = 2, optimized_path: str | os.PathLike | None = None):
    """An ONNX Runtime CPU session: `threads` intra-op threads, spinning off, full optimisation.

    Spinning threads keep a core busy after each run; with several sessions in one process
    (or a second process on the machine) every variant would then read several times slow."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str | os.PathLike, threads: int = 2) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        ort_session(path, threads, out)
        return dict(Counter(n.op_type for n in onnx.load(str(out)).graph.node))


def run_onnx(session, images: torch.Tensor, batch: int = 16, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits of an ONNX Runtime session (or a path) over preprocessed images (N, 3, H, W)."""
    if isinstance(session, (str, os.PathLike)):
        session = ort_session(session)
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(images), batch):
        out.append(torch.from_numpy(session.run(None, {name: images[i:i + batch].numpy()})[0]))
        if progress is not None:
            progress(min(batch, len(images) - i))
    return torch.cat(out)


@dataclass
class Latency:
    batch: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    times: list[float] = field(default_factory=list, repr=False)   # every run, ms

    def per_image_ms(self) -> float:
        return self.median_ms / self.batch


def measure_latency(run: Callable[[], object], batch: int, runs: int = 30, warmup: int = 5) -> Latency:
    """Median wall time of `run()` (one batch of `batch` images) over `runs` runs after `warmup`."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Latency(batch, runs, statistics.median(times), q[0], q[-1], times)


def session_latency(session, batch: int, input_shape: tuple[int, int, int] = (3, 224, 224), runs: int = 30,
                    warmup: int = 5, images: torch.Tensor | None = None) -> Latency:
    """measure_latency() of an ONNX Runtime session on one fixed batch (real images if given)."""
    if isinstance(session, (str, os.PathLike)):
        session = ort_session(session)
    x = (images[:batch] if images is not None and len(images) >= batch
         else torch.randn(batch, *input_shape)).numpy()
    name = session.get_inputs()[0].name
    return measure_latency(lambda: session.run(None, {name: x}), batch, runs, warmup)


@dataclass
class Parity:
    """ONNX Runtime int8 against the simulation of the same config, on the same images."""
    n_images: int
    agreement: float                # share of images with the same top-1
    top1_real: float | None         # against labels, when given
    top1_sim: float | None
    logits_sqnr_db: float           # simulation logits as the signal

    def summary(self) -> str:
        acc = "" if self.top1_real is None else (f", top-1 {self.top1_real * 100:.1f}% real vs "
                                                 f"{self.top1_sim * 100:.1f}% simulated")
        return (f"int8 vs simulation on {self.n_images} images: top-1 agreement {self.agreement * 100:.1f}%{acc}, "
                f"logits SQNR {self.logits_sqnr_db:.1f} dB")


@torch.no_grad()
def parity(qmodel: QuantResult | nn.Module, session, images: torch.Tensor, labels: torch.Tensor | None = None,
           sim_logits: torch.Tensor | None = None, batch: int = 16) -> Parity:
    """Top-1 agreement and logits SQNR between the ONNX model (session or path) and qmodel."""
    real = run_onnx(session, images, batch)
    if sim_logits is None:
        sim_logits = torch.cat([qmodel(images[i:i + batch]) for i in range(0, len(images), batch)])
    pr, ps = real.argmax(1), sim_logits.argmax(1)
    n = len(images)
    return Parity(n, float((pr == ps).float().mean()) if n else 0.0,
                  None if labels is None else float((pr == labels).float().mean()),
                  None if labels is None else float((ps == labels).float().mean()),
                  tensor_sqnr_db(sim_logits, real))


# --- ONNX Runtime's own quantizers, as baselines --------------------------------------------------

def ort_static_int8(float_path: str | os.PathLike, out_path: str | os.PathLike, calib_images: torch.Tensor,
                    per_channel: bool = True, batch: int = 1) -> str:
    """ONNX Runtime's quantize_static: uint8 per-tensor activations (min/max over `calib_images`,
    fed `batch` at a time: the float graph's batch size if it is fixed), int8 weights (per channel
    by default), QDQ format. The static per-tensor baseline."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(calib_images) - len(calib_images) % batch
            self.it = iter([{"input": calib_images[i:i + batch].numpy()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.it, None)

    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    try:
        quantize_static(str(float_path), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out_path)


def ort_dynamic_int8(float_path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """ONNX Runtime's quantize_dynamic: int8 weights, activations quantized per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QUInt8)
    return str(out_path)


def cpu_int8_features() -> str:
    """What this CPU offers integer kernels (VNNI, AVX-512, AMX), for reading latencies right."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        import platform

        return f"{platform.machine()}: int8 features unknown"
    wanted = [("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX-INT8"),
              ("avx512f", "AVX-512"), ("avx2", "AVX2")]
    have = [label for flag, label in wanted if flag in flags]
    vnni = any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return (", ".join(have) or "no AVX2") + ("" if vnni else " (no VNNI/AMX: int8 dot products take more instructions)")
