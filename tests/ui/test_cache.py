"""Re-quantizing fast for many users: the quantization memo, the model cache, the per-layer table, the views."""
import contextlib
from pathlib import Path

import pytest
import torch

import spiq
from spiq.ui import views
from spiq.ui.cache import ModelCache
from spiq.core.metrics import parameter_checksum
from spiq.config import METHODS, ConfigError, QuantConfig
from spiq.models.data import open_image
from spiq.quantize.memo import Memo

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def _same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def memo(lite0, lite0_loaded):
    m = Memo(lite0_loaded)
    m.warm(QuantConfig(), bits=(4, 5))   # what the app does in the background: ranges and their effects
    return m


@pytest.mark.parametrize("kw", [dict(weight_bits=8, input_bits=4), dict(weight_bits=4, input_bits=8, fold="always"),
                                dict(method="static-tensor", weight_bits=6, input_bits=5),
                                dict(method="dynamic-channel", weight_bits=8, input_bits=4, weight_rounding="nearest"),
                                dict(method="spiq", weight_bits=8, input_bits=5,
                                     overrides={"conv_head": {"input_bits": 8}, "classifier": {"skip": True}})])
def test_memoised_requantization_is_identical(lite0, memo, sample, kw, lite0_loaded):
    config = QuantConfig(**kw)
    fresh = spiq.quantize(lite0_loaded, config)
    fast = spiq.quantize(lite0_loaded, config, memo=memo)
    _same_model(fresh, fast)
    x = sample[0][:4]
    with torch.no_grad():
        assert torch.equal(fresh(x), fast(x))
    # a second request for the same config reuses the searched ranges and weights
    again = spiq.quantize(lite0_loaded, config, memo=memo)
    _same_model(fresh, again)


def test_a_memo_of_another_model_is_refused(lite0, memo):
    other, _, _ = spiq.load_model("efficientnet_lite0")
    with pytest.raises(ValueError, match="another model"):
        spiq.quantize(other, QuantConfig(), memo=memo)


@pytest.mark.slow   # a heavy end-to-end job
def test_cache_shares_models_bounds_the_lru_and_never_touches_the_float_model():
    cache = ModelCache(max_quantized=2, calib_dir=ASSETS)
    model = cache.load("efficientnet_lite0").model
    before = parameter_checksum(model)
    a = cache.quantized("efficientnet_lite0", QuantConfig(input_bits=4))
    assert cache.quantized("efficientnet_lite0", QuantConfig(input_bits=4)) is a
    # key order in a recipe does not make another model
    same = QuantConfig.from_json('{"input_bits": 4, "method": "spiq", "weight_bits": 8}')
    assert cache.quantized("efficientnet_lite0", same) is a
    cache.quantized("efficientnet_lite0", QuantConfig(input_bits=5))
    cache.quantized("efficientnet_lite0", QuantConfig(method="calib-mse", input_bits=6))  # calibrates on assets/
    assert len(cache.cached_configs()) == 2
    assert cache.quantized("efficientnet_lite0", QuantConfig(input_bits=4)) is not a  # evicted, made again
    img = open_image(ASSETS / "cat.jpg")
    sc = views.scene(cache, "efficientnet_lite0", QuantConfig(input_bits=4), img)
    views.layer_error(cache, sc)
    views.attribution(cache, sc, "grad-cam")
    assert parameter_checksum(model) == before
    assert not any(p.requires_grad for p in model.parameters())


def test_layer_table_round_trip_and_cell_errors(lite0):
    config = QuantConfig(weight_bits=8, input_bits=4, overrides={"conv_head": {"input_bits": 8}})
    rows = views.layer_rows(lite0, config)
    assert len(rows) == 50 and rows[0][:3] == ["conv_stem", "conv 3x3", 3]
    assert {r[0]: r for r in rows}["conv_head"][5] == 8
    assert {r[0]: r for r in rows}["blocks.0.0.conv_dw"][1] == "depthwise conv"
    assert views.config_from_rows(config, rows) == config           # unchanged table, same recipe
    rows[1][4], rows[2][6], rows[3][7] = "6", "tensor", "true"      # what a browser table sends back
    edited = views.config_from_rows(config, rows)
    assert edited.overrides[rows[1][0]].weight_bits == 6
    assert edited.overrides[rows[2][0]].input_granularity == "tensor"
    assert edited.overrides[rows[3][0]].skip
    for col, value, msg in ((5, "4.5", "input bits"), (5, "x", "input bits"), (4, 1, "from 2 to 16"),
                            (6, "row", "granularity"), (7, "maybe", "skip"), (3, "spik", "unknown method")):
        bad = [list(r) for r in views.layer_rows(lite0, config)]
        bad[10][col] = value
        with pytest.raises(ConfigError, match=msg):
            views.config_from_rows(config, bad)


@pytest.mark.slow   # a heavy end-to-end job
def test_views_on_a_real_image():
    cache = ModelCache(calib_dir=ASSETS)
    img = open_image(ASSETS / "cat.jpg")
    config = QuantConfig(weight_bits=8, input_bits=4)
    sc = views.scene(cache, "efficientnet_lite0", config, img)
    assert sc.picture.shape == (224, 224, 3) and sc.picture.dtype.name == "uint8"
    fig, text = views.predictions(cache, sc)
    assert "Float: **tiger cat**" in text and len(fig.get_axes()) == 2
    fig, rows = views.methods(cache, "efficientnet_lite0", config, img)
    assert [r["method"] for r in rows] == [m for m in METHODS if m != "liu-ptq"]   # liu-ptq: transformers only
    dyn = {r["method"]: r for r in rows}
    # per channel beats per tensor under the same rule: each sample's min/max, or the BN law
    # (MSE-clipped ranges can beat unclipped min/max at 4 bits: no method is a ceiling on one image)
    assert dyn["dynamic-channel"]["logit_sqnr"] > dyn["dynamic-tensor"]["logit_sqnr"] + 1
    assert dyn["spiq"]["logit_sqnr"] > dyn["static-tensor"]["logit_sqnr"]
    assert all(r["calibrated_on"] for r in rows if r["method"].startswith("calib"))
    story = views.story(cache, "efficientnet_lite0", config, img)
    assert "SPIQ" in story.layout.annotations[1].text and len(story.data) == 8
    emap = views.error_map(cache, sc, "blocks.2.0.conv_dw", channel=3)
    # the 224-pixel map goes to the browser pooled 2x2, each cell centred on the pixels it covers
    assert emap.data[0].source.startswith("data:image/jpeg;base64,")
    assert emap.data[1].z.shape == (112, 112) and (emap.data[1].x0, emap.data[1].dx) == (0.5, 2.0)
    with pytest.raises(ValueError, match="channels 0 to"):
        views.error_map(cache, sc, "blocks.2.0.conv_dw", channel=10_000)


def test_distilling_a_new_model_leaves_the_shared_lock_to_other_models(monkeypatch, register, tmp_path):
    import threading

    import torchvision

    from spiq.quantize import distill

    from spiq.models import registry

    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))   # nothing cached for the new model
    lite0_spec = registry.get_spec("efficientnet_lite0")
    register(registry.ModelSpec("cnn", "random weights (tests)", lambda: torchvision.models.resnet18(weights=None).eval(),
                                lambda: None, lite0_spec.preprocess, "random ResNet-18"))
    started, release = threading.Event(), threading.Event()

    def slow_distill(model, n, lo, hi, size=224, *_a, **_k):   # stands in for minutes of distilling
        started.set()
        assert release.wait(120)
        return torch.zeros(n, lo.numel(), size, size)
    monkeypatch.setattr(distill, "distill_images", slow_distill)
    cache = ModelCache()
    made, bar = [], []
    worker = threading.Thread(target=lambda: made.append(cache.quantized("cnn", QuantConfig(), progress=lambda f, _m:
                                                                          bar.append(f))))
    worker.start()
    try:
        assert started.wait(120)
        # while "cnn" distills, another model is quantized through the shared lock
        other = cache.quantized("efficientnet_lite0", QuantConfig(input_bits=6))
        assert other.report.bias_images == 8 and worker.is_alive()
    finally:
        release.set()
        worker.join(120)
    assert made[0].report.bias_images == 8 and made[0].report.bias_fit
    assert bar == sorted(bar) and bar[-1] == 1.0 and min(bar) >= 0.9   # quantizing after the distilling
    # the second request for the model waits for nothing
    assert cache.distill("cnn", QuantConfig(input_bits=5)) is False


def test_urgent_waiters_take_the_lock_first_and_it_is_reentrant():
    import threading
    import time

    from spiq.ui.cache import PriorityLock

    lock, order = PriorityLock(), []
    with lock:
        with lock:   # re-entrant
            pass

        def take(name, urgent):
            with lock.urgent() if urgent else contextlib.nullcontext():
                with lock:
                    order.append(name)
        normal = threading.Thread(target=take, args=("views", False))
        normal.start()
        time.sleep(0.1)
        urgent = threading.Thread(target=take, args=("predictions", True))
        urgent.start()
        time.sleep(0.1)
    normal.join(5)
    urgent.join(5)
    assert order == ["predictions", "views"]
    with pytest.raises(RuntimeError):
        lock.release()


def test_views_lru_is_bounded_and_counts_computes_and_hits():
    cache = ModelCache(max_views=2)
    assert cache.view(("a",), lambda: 1) == 1 and cache.view(("a",), lambda: 2) == 1
    cache.view(("b",), lambda: 3)
    cache.view(("c",), lambda: 4)
    assert cache.view_keys() == [("b",), ("c",)] and cache.cached_view(("a",)) == (False, None)
    assert (cache.view_computes, cache.view_hits) == (3, 1)


def test_a_pinned_config_outlives_the_lru():
    cache, config = ModelCache(max_quantized=1), QuantConfig(method="static-tensor", bias_images=0)
    cache.pin("efficientnet_lite0", config)
    pinned = cache.quantized("efficientnet_lite0", config)
    for bits in (5, 6):
        cache.quantized("efficientnet_lite0", config.replace(input_bits=bits))
    assert len(cache.cached_configs()) == 2
    assert cache.quantized("efficientnet_lite0", config) is pinned
