"""The int8 ONNX export: per-tensor quantizers, ONNX Runtime's fusion, an exact float fold, parity
with the simulation, and clear errors that leave no file behind."""
import os

import onnx
import pytest
import torch
from torch import nn

import spiq
from spiq import export as ex
from spiq.export import runtime as rt
from spiq.cli import main
from spiq.core.metrics import mean_logit_sqnr_db
from spiq.export import ExportError
from spiq.core.quant import GridQuant, QuantLayer


@pytest.fixture(scope="module")
def spiq_w8a8(lite0, lite0_loaded):
    return spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8))


@pytest.fixture(scope="module")
def exported(spiq_w8a8, tmp_path_factory):
    return ex.export_onnx(spiq_w8a8, tmp_path_factory.mktemp("onnx") / "lite0_spiq_w8a8.onnx")


@pytest.fixture(scope="module")
def images(sample):
    """64 real images spread over the sample (every 7th)."""
    x, y = sample
    return x[::7][:64], y[::7][:64]


def test_every_activation_quantizer_is_per_tensor_uint8(exported):
    model = onnx.load(exported.path)
    inits = {i.name: i for i in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) > 50
    for n in quantizers:
        scale, zero = inits[n.input[1]], inits[n.input[2]]
        assert list(scale.dims) == [] and list(zero.dims) == [], n.name
        assert zero.data_type == onnx.TensorProto.UINT8
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_w")]
    assert len(weights) == 50 and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weights)
    # lite0 needs no per-channel Mul anywhere: every scale went into a layer's weights or a shared stream
    assert exported.mul_layers == {} and "Mul" not in exported.op_counts
    assert len(exported.int8_layers) == 50 and exported.float_layers == []


def test_onnx_runtime_fuses_it_into_integer_kernels(exported):
    ops = rt.optimized_op_counts(exported.path)
    assert ops.get("QLinearConv") == 49
    assert ops.get("QLinearAdd") == 9
    assert ops.get("QGemm") == 1 and ops.get("QLinearGlobalAveragePool") == 1
    # nothing left in float between the input quantizer and the logits
    assert not {"Conv", "Add", "Mul", "Gemm", "Min", "Clip", "DequantizeLinear"} & set(ops), ops
    assert ops.get("QuantizeLinear") == 1


def test_static_same_padding_and_static_shapes(exported):
    model = onnx.load(exported.path)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 224, 224]
    ops = {n.op_type for n in model.graph.node}
    assert not {"Shape", "Gather", "Cast", "Div", "Sub", "Pad"} & ops   # no run-time "same" padding arithmetic
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    assert next(a.ints for a in stem.attribute if a.name == "pads") == [0, 0, 1, 1]


def test_float_fold_is_exact(spiq_w8a8, images, tmp_path):
    report = ex.export_onnx(spiq_w8a8, tmp_path / "folded.onnx", quantized=False)
    assert "QuantizeLinear" not in report.op_counts
    x = images[0][:8]
    twin = ex.float_twin(spiq_w8a8, report)
    with torch.no_grad():
        expect = twin(x)
    got = rt.run_onnx(report.path, x)
    assert (got - expect).abs().max() <= 1e-5 * expect.abs().max()
    # the twin is the simulation's own network where no grid had to change
    for name in report.int8_layers:
        if name not in report.requantized:
            assert torch.equal(twin.get_submodule(name).layer.weight, spiq_w8a8.model.get_submodule(name).layer.weight)


def test_int8_graph_computes_its_simulation(spiq_w8a8, exported, images):
    rows = ex.layer_sqnr(ex.int8_simulation(spiq_w8a8, exported), exported, images[0][:8])
    by_layer = {r["layer"]: r["sqnr_db"] for r in rows}
    # Rounding is chaotic in depth (one flipped code flips more in the next layer), so only the
    # first layers can show that the integer graph is the simulated arithmetic itself.
    assert by_layer["conv_stem"] > 100
    for name in ["blocks.0.0.conv_dw", "blocks.0.0.conv_pw", "blocks.1.0.conv_pw", "blocks.1.0.conv_dw"]:
        assert by_layer[name] > 55, (name, by_layer[name])


def test_parity_with_the_simulation_of_the_config(spiq_w8a8, exported, images):
    x, y = images
    par = rt.parity(spiq_w8a8, exported.path, x, y)
    assert par.n_images == 64
    assert par.agreement >= 0.9, par.summary()
    assert par.logits_sqnr_db >= 18, par.summary()
    assert par.top1_real >= par.top1_sim - 0.05
    rows = ex.layer_sqnr(spiq_w8a8, exported, x[:8])
    assert len(rows) == 50 and all(r["sqnr_db"] > 12 for r in rows)


def test_int8_graph_config_simulates_what_onnx_runtime_runs(spiq_w8a8, exported, images, tmp_path, lite0_loaded):
    x, y = images
    twin = spiq.quantize(lite0_loaded.model,
                         spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, int8_graph=True),
                         preprocess=spiq_w8a8.preprocess)
    report = ex.export_onnx(twin, tmp_path / "twin.onnx")
    # the same graph as the plain config's: the twin simulates it, shared grids and extra quantizers too
    assert report.requantized == exported.requantized and report.op_counts == exported.op_counts
    assert sum(isinstance(m, GridQuant) for m in twin.model.modules()) == len(report.plan.q_points) > 0
    assert isinstance(twin.model.get_submodule("blocks.1.1.conv_pw"), QuantLayer)
    plain = rt.parity(spiq_w8a8, exported.path, x, y)
    par = rt.parity(twin, report.path, x, y)
    assert par.agreement >= plain.agreement and par.logits_sqnr_db > plain.logits_sqnr_db + 2, (par, plain)
    # its report shows the shared grids its re-quantized layers read; its source's keeps SPIQ's own
    source = twin.source.report
    assert twin.report.layers.keys() == source.layers.keys()
    for name in report.requantized:
        got, grid, own = twin.report.layers[name], report.plan.layers[name].grid, source.layers[name].range
        assert got.input_bits == 8 and got.input_per_channel and "shared grid" in got.data_free_range_from
        assert torch.equal(got.range.lo, grid.lo.float()) and torch.equal(got.range.hi, grid.hi.float())
        assert not (torch.allclose(own.lo, got.range.lo) and torch.allclose(own.hi, got.range.hi)), name
    with pytest.raises(spiq.ConfigError, match="int8_graph"):
        spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=4, int8_graph=True)


def test_int8_graph_carries_the_bias_fit_into_the_layers_it_requantizes(spiq_w8a8, exported, images, tmp_path,
                                                                       lite0_loaded):
    x, _ = images
    source = lite0_loaded.model
    config = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, int8_graph=True)
    pre = spiq_w8a8.preprocess
    fitted = spiq.quantize(source, config, preprocess=pre)   # bias_images automatic: 8 on a model with BatchNorm
    plain = spiq.quantize(source, config.replace(bias_images=0), preprocess=pre)
    fit = fitted.source.report.bias_fit
    assert fitted.report.bias_images == 8 and not plain.report.bias_fit
    # the graph's biases in original units, before the int32 rounding
    got = ex.export_onnx(fitted, tmp_path / "fitted.onnx").plan.layers
    base = ex.export_onnx(plain, tmp_path / "plain.onnx").plan.layers
    carried = {n for n in fit if got[n].requantized}
    assert len(carried) >= 10 and set(fit) - carried   # re-quantized layers and the others
    for name, shift in fit.items():
        torch.testing.assert_close(got[name].bias - base[name].bias, -shift.double(), atol=1e-6, rtol=1e-4, msg=name)
    fp = source(x)
    assert mean_logit_sqnr_db(fp, fitted(x)) > mean_logit_sqnr_db(fp, plain(x))


def test_equalized_model_exports_with_per_channel_caps(lite0, images, tmp_path, lite0_loaded):
    """After cross-layer equalization each ReLU6 caps every channel at its own value."""
    x, y = images
    q = spiq.quantize(lite0_loaded, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, equalize=True))
    folded = ex.export_onnx(q, tmp_path / "eq_float.onnx", quantized=False)
    assert folded.op_counts.get("Min", 0) > 0     # the caps a per-tensor quantizer does not subsume
    with torch.no_grad():
        expect = ex.float_twin(q, folded)(x[:8])
    got = rt.run_onnx(folded.path, x[:8])
    assert (got - expect).abs().max() <= 1e-5 * expect.abs().max()
    report = ex.export_onnx(q, tmp_path / "eq.onnx")
    assert rt.optimized_op_counts(report.path).get("QLinearConv", 0) >= 40
    par = rt.parity(q, report.path, x, y)
    assert par.agreement >= 0.9, par.summary()


class _SiluNet(nn.Module):
    """A tiny net with an op that does not commute with a per-channel scale, in front of a padded conv."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.act1 = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16, eps=1e-3)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                if isinstance(m, nn.BatchNorm2d):
                    n = m.num_features
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        self.eval()

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_per_channel_mul_where_the_fold_is_not_legal(tmp_path):
    net = _SiluNet()
    # the classifier reads its pooled input per tensor, so conv2's output can be quantized before the pool
    config = spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, fold="always", bias_images=0,
                              overrides={"fc": {"input_granularity": "tensor"}})
    q = spiq.quantize(net, config)
    report = ex.export_onnx(q, tmp_path / "silu.onnx", input_size=32)
    # the graph input (ImageNet normalisation assumed: per-channel ranges) and the SiLU output
    assert set(report.mul_layers) == {"conv1", "conv2"}
    assert "SiLU" in report.mul_layers["conv2"] or "silu" in report.mul_layers["conv2"]
    assert report.op_counts["Mul"] >= 3 and report.op_counts["Pad"] == 2   # padded in original units
    ops = rt.optimized_op_counts(report.path)
    assert ops.get("QLinearConv") == 1 and ops.get("QGemm") == 1   # conv1 feeds the SiLU: it stays float
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    par = rt.parity(q, report.path, x)
    assert par.logits_sqnr_db > 30 and par.agreement >= 0.95, par.summary()


def test_per_channel_pooled_grid_keeps_the_pool_path_in_float(tmp_path):
    # one per-tensor scale cannot give every channel of the tensor before the pool its ReLU range
    q = spiq.quantize(_SiluNet(), spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, fold="always",
                                                   bias_images=0))
    report = ex.export_onnx(q, tmp_path / "silu.onnx", input_size=32)
    assert any("before the global pool" in n for n in report.notes)
    ops = rt.optimized_op_counts(report.path)
    assert "QLinearConv" not in ops and ops.get("QGemm") == 1
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert rt.parity(q, report.path, x).logits_sqnr_db > 30


class _SinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.sin(self.conv(x)).mean((2, 3)))


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path):
    q = spiq.quantize(_SinNet().eval(), spiq.QuantConfig(method="static-tensor", weight_bits=8, input_bits=8))
    out = tmp_path / "sin.onnx"
    with pytest.raises(ExportError, match=r"op `sin`"):
        ex.export_onnx(q, out, input_size=16)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("changes, message", [({"method": "dynamic-tensor"}, "dynamic input quantization"),
                                              ({"input_bits": 4}, "needs 8-bit inputs")])
def test_configs_without_an_int8_graph_are_refused(changes, message, tmp_path):
    q = spiq.quantize(_SiluNet(), spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, bias_images=0)
                      .replace(**changes))
    with pytest.raises(ExportError, match=message):
        ex.export_onnx(q, tmp_path / "x.onnx", input_size=32)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_file(spiq_w8a8, tmp_path, monkeypatch):
    def broken_save(proto, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ex.export_onnx(spiq_w8a8, tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "static.onnx"
    assert main(["export", "--model", "efficientnet_lite0", "--method", "static-tensor", "--wbits", "8",
                 "--abits", "8", "--out", str(out)]) == 0
    assert out.exists()
    printed = capsys.readouterr().out
    assert "50 int8 layers" in printed and "QLinearConv 49" in printed
    bad = tmp_path / "dynamic.onnx"
    assert main(["export", "--model", "efficientnet_lite0", "--method", "dynamic-tensor", "--out", str(bad)]) == 2
    assert "dynamic input quantization" in capsys.readouterr().err
    assert not bad.exists()
