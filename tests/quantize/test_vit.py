"""Vision transformers: TapAttention, SPIQ's LayerNorm ranges and Liu et al.'s PTQ, on real images."""
import itertools
import math

import pytest
import torch

import spiq
from spiq.methods import liu
from spiq.core.metrics import tensor_sqnr_db
from spiq.core.metrics import parameter_checksum
from spiq.core.quant import ActQuant, QuantLayer
from spiq.quantize.memo import Memo
from spiq.models.vit import TapAttention, vit_graph

from spiq.models.vit import toy_vit


@pytest.fixture(scope="module")
def prepared(vit):
    return Memo(vit).reference(spiq.QuantConfig())


@pytest.fixture(scope="module")
def calibrations(prepared, vit_images):
    calib, held = vit_images
    g = prepared.vit
    return liu.collect(prepared.folded, g, calib, 64), liu.collect(prepared.folded, g, held, 64)


def _plan(prepared, calib, bits, **settings):
    return liu.plan(prepared.folded, prepared.vit, calib, lambda _name: (bits, bits), liu.LiuSettings(points=50, **settings))


def test_tap_attention_is_the_same_float_model(vit, prepared, vit_images):
    _, held = vit_images
    attn = [m for m in prepared.folded.modules() if isinstance(m, TapAttention)]
    assert len(attn) == 2
    with torch.no_grad():
        ref, out = vit(held), prepared.folded(held)
    assert tensor_sqnr_db(ref, out) > 100


def test_vit_graph_names_every_site(vit):
    g = vit_graph(vit)
    assert g.patch == "patch_embed.proj" and g.head == "head" and g.head_norm == "norm"
    assert [b.qkv for b in g.blocks] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert vit_graph(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_quantize_leaves_the_float_vit_alone(vit, vit_images):
    calib, _ = vit_images
    before = parameter_checksum(vit)
    for method in ("spiq", "liu-ptq", "dynamic-tensor"):
        spiq.quantize(vit, spiq.QuantConfig(method=method, weight_bits=6, input_bits=6, search_points=10), calib_data=calib)
    assert parameter_checksum(vit) == before
    assert not any(isinstance(m, (TapAttention, QuantLayer)) for m in vit.modules())


@pytest.mark.parametrize("method", ["spiq", "static-tensor", "calib-minmax", "dynamic-tensor", "liu-ptq"])
def test_every_method_quantizes_all_matmuls(vit, vit_images, method):
    calib, held = vit_images
    q = spiq.quantize(vit, spiq.QuantConfig(method=method, weight_bits=8, input_bits=8, search_points=10), calib_data=calib)
    taps = [m for m in q.model.modules() if isinstance(m, ActQuant)]
    layers = [m for m in q.model.modules() if isinstance(m, QuantLayer)]
    assert len(taps) == 8 and all(t.quant is not None and t.quant.bits == 8 for t in taps)
    assert len(layers) == 2 * 4 + 2
    with torch.no_grad():
        assert tensor_sqnr_db(vit(held), q(held)) > 5


def test_spiq_layernorm_ranges_are_per_channel_and_beat_per_tensor(vit, vit_images):
    """β_c ± k|γ_c| per channel: the outlier channels get their own range, the rest keep precision."""
    _, held = vit_images
    with torch.no_grad():
        ref = vit(held)
    sqnr = {}
    for method in ("spiq", "static-tensor"):
        q = spiq.quantize(vit, spiq.QuantConfig(method=method, weight_bits=8, input_bits=6))
        with torch.no_grad():
            sqnr[method] = tensor_sqnr_db(ref, q(held))
        if method == "spiq":
            rep = q.report.layers["blocks.0.attn.qkv"]
            assert rep.input_per_channel and rep.range.hi.shape == (96,)
            gain = vit.blocks[0].norm1.weight.abs()
            width = rep.range.hi - rep.range.lo
            # the three outlier gains get the three widest ranges
            assert set(width.topk(3).indices.tolist()) == set(gain.topk(3).indices.tolist())
    assert sqnr["spiq"] > sqnr["static-tensor"] + 1.0, sqnr


def test_spiq_linear_on_tokens_is_integer_exact(vit, vit_images):
    """Per-channel codes on (B, N, C) tokens: integer accumulate then rescale equals the simulation."""
    calib, _ = vit_images
    q = spiq.quantize(vit, spiq.QuantConfig(method="spiq", weight_bits=8, input_bits=8, fold="always"))
    layer = q.model.get_submodule("blocks.0.attn.qkv")
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        q(calib[:2])
    handle.remove()
    assert seen["x"].dim() == 3 and layer.folded
    with torch.no_grad():
        sim, exact = layer(seen["x"]), layer.integer_forward(seen["x"])
    assert torch.allclose(sim, exact, rtol=1e-4, atol=1e-4 * sim.abs().max().item())


def test_interval_search_ends_at_a_coordinate_optimum(calibrations):
    """No grid candidate for either operand, the other fixed, beats what the search returns."""
    from torch.nn import functional as F

    calib, _ = calibrations
    a = calib.mlp_in["blocks.0.mlp.fc1"]
    w = torch.randn(64, a.shape[-1], generator=torch.Generator().manual_seed(0)) / 10

    def fn(x, y):
        return F.linear(x, y)

    found = liu.search_intervals(a, "signed", 4, w, "weight", 4, fn, fn(a, w), points=40)
    sim = liu.Similarity(fn(a, w))
    aq, wq = liu.on_interval(a, found.delta_a, "signed", 4), liu.on_interval(w, found.delta_b, "weight", 4)
    assert math.isclose(float(sim(fn(aq, wq))), found.score, rel_tol=1e-6)
    assert found.score > found.max_score and found.delta_a != found.max_a
    for g in torch.linspace(0.5, 1.2, 40).tolist():
        assert float(sim(fn(aq, liu.on_interval(w, g * found.max_b, "weight", 4)))) <= found.score + 1e-7
        assert float(sim(fn(liu.on_interval(a, g * found.max_a, "signed", 4), wq))) <= found.score + 1e-7


def test_pearson_search_beats_max_intervals_on_held_out_images(prepared, calibrations):
    calib, held = calibrations
    plan = _plan(prepared, calib, 4)
    scores = liu.score(prepared.folded, prepared.vit, plan, held)
    assert len(scores) == 2 * 6 + 2
    for name, s in scores.items():
        assert s.pearson > s.pearson_max, (name, s)


def test_ranking_term_reduces_attention_inversions(prepared, calibrations):
    """γ = 0.1 against γ = 0: never more reversed score pairs on held-out images, fewer over all widths."""
    calib, held = calibrations
    counts = {}
    for bits in (4, 6, 8):
        for weight in (0.0, 0.1):
            plan = _plan(prepared, calib, bits, rank_weight=weight)
            counts[bits, weight] = sum(r for r, _ in liu.inversions(prepared.folded, prepared.vit, plan, held).values())
        assert counts[bits, 0.1] <= counts[bits, 0.0], counts
    assert sum(counts[b, 0.1] for b in (4, 6, 8)) < sum(counts[b, 0.0] for b in (4, 6, 8)), counts


def test_bias_correction_reduces_mean_output_error(prepared, calibrations):
    """At 4 bits, where rounding errors are biased enough to matter, on every layer of held-out images."""
    calib, held = calibrations
    errors = {}
    for on in (False, True):
        plan = _plan(prepared, calib, 4, bias_correction=on)
        errors[on] = {n: s.mean_error for n, s in liu.score(prepared.folded, prepared.vit, plan, held).items()
                      if n in plan.layers}
    assert len(errors[True]) == 2 * 4 + 2
    for name in errors[True]:
        assert errors[True][name] < errors[False][name], name
    assert sum(errors[True].values()) < 0.5 * sum(errors[False].values())


def test_mixed_precision_meets_the_budget_exactly_and_is_reproducible(vit, vit_images):
    calib, _ = vit_images
    config = spiq.QuantConfig(method="liu-ptq", weight_bits=8, input_bits=8, mixed_precision=6, search_points=20)
    chosen = []
    for _ in range(2):
        q = spiq.quantize(vit, config, calib_data=calib)
        bits = q.report.searched["liu-ptq"].module_bits
        size = {m: sum(p.numel() for n, p in vit.get_submodule(m).named_parameters() if n.endswith("weight")
                       and "norm" not in n) for m in bits}
        assert sum(size[m] * b for m, b in bits.items()) == 6 * sum(size.values())
        for m, b in bits.items():  # the module's layers run at its bits
            for name in ("qkv", "proj") if m.endswith("attn") else ("fc1", "fc2"):
                rep = q.report.layers[f"{m}.{name}"]
                assert (rep.weight_bits, rep.input_bits) == (b, b)
        chosen.append(bits)
    assert chosen[0] == chosen[1] and len(chosen[0]) == 4
    assert len(set(chosen[0].values())) > 1   # this model's modules differ: a uniform 6 would be no choice


def test_choose_bits_is_the_exact_optimum():
    gen = torch.Generator().manual_seed(1)
    sizes = {"a": 4, "b": 8, "c": 4, "d": 8}
    costs = {m: {b: float(torch.rand(1, generator=gen)) * 2.0 ** -b for b in range(4, 9)} for m in sizes}
    chosen = liu.choose_bits(costs, sizes, 6)
    best = min((sum(costs[m][b] for m, b in zip(sizes, pick)), pick) for pick in itertools.product(range(4, 9), repeat=4)
               if sum(sizes[m] * b for m, b in zip(sizes, pick)) == 6 * sum(sizes.values()))
    assert tuple(chosen.values()) == best[1]
    with pytest.raises(ValueError, match="below the smallest"):
        liu.choose_bits(costs, sizes, 3)


def test_liu_quantizers_are_the_searched_intervals(vit, vit_images):
    calib, _ = vit_images
    q = spiq.quantize(vit, spiq.QuantConfig(method="liu-ptq", weight_bits=6, input_bits=6, search_points=20), calib_data=calib)
    plan = q.report.searched["liu-ptq"]
    layer = q.model.get_submodule("blocks.1.mlp.fc1")
    site = plan.layers["blocks.1.mlp.fc1"]
    assert math.isclose(float(layer.input_quant.scale), site.search.delta_a, rel_tol=1e-6)
    assert int(layer.weight_codes.abs().max()) <= 31
    assert math.isclose(float(layer.weight_scale), site.search.delta_b, rel_tol=1e-6)
    p_in = q.model.get_submodule("blocks.0.attn.p_in").quant
    assert int(p_in.zero) == 0 and math.isclose(float(p_in.scale), plan.matmuls["blocks.0.attn.pv"].search.delta_a, rel_tol=1e-6)
    assert set(plan.inversions) == {"blocks.0.attn.qk", "blocks.1.attn.qk"}


def test_transformer_only_settings_are_refused_clearly(lite0, vit, lite0_loaded):
    with pytest.raises(spiq.ConfigError, match="vision transformers"):
        spiq.quantize(lite0_loaded, spiq.QuantConfig(method="liu-ptq"), calib_data=torch.zeros(1, 3, 224, 224))
    with pytest.raises(spiq.ConfigError, match="calibration images"):
        spiq.quantize(vit, spiq.QuantConfig(method="liu-ptq"))
    with pytest.raises(spiq.ConfigError, match="mixed_precision"):
        spiq.QuantConfig(method="spiq", mixed_precision=6)
    with pytest.raises(spiq.ConfigError, match="mixed_precision"):
        spiq.QuantConfig.from_dict({"method": "liu-ptq", "mixed_precision": 40})
    with pytest.raises(spiq.ConfigError, match="search_points"):
        spiq.QuantConfig(method="liu-ptq", search_points=0)
    assert spiq.QuantConfig.from_json(spiq.QuantConfig(method="liu-ptq", mixed_precision=6.5).to_json()).mixed_precision == 6.5


def test_toy_vit_is_deterministic():
    a, b = toy_vit(3)[0], toy_vit(3)[0]
    assert parameter_checksum(a) == parameter_checksum(b)


def test_liu_ptq_respects_per_layer_overrides(vit, vit_images):
    calib, held = vit_images
    config = spiq.QuantConfig(method="liu-ptq", weight_bits=6, input_bits=6, search_points=10, overrides={
        "blocks.0.attn.qkv": {"skip": True}, "blocks.0.attn.proj": {"weight_bits": 8, "input_bits": 8}})
    q = spiq.quantize(vit, config, calib_data=calib)
    layers = q.report.layers
    assert "blocks.0.attn.qkv" not in layers and not isinstance(q.model.get_submodule("blocks.0.attn.qkv"), QuantLayer)
    assert (layers["blocks.0.attn.proj"].weight_bits, layers["blocks.0.attn.proj"].input_bits) == (8, 8)
    assert (layers["blocks.1.attn.proj"].weight_bits, layers["blocks.1.attn.proj"].input_bits) == (6, 6)
    # the skipped qkv's matmuls stay float; the other block's are quantized
    q_in = [q.model.get_submodule(f"blocks.{b}.attn.q_in").quant for b in (0, 1)]
    assert q_in[0] is None and q_in[1].bits == 6
    with torch.no_grad():
        assert tensor_sqnr_db(vit(held), q(held)) > 5
