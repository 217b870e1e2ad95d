"""The app through its real HTTP API (gradio_client): many users at once, bad input, shared models untouched."""
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from conftest import APP_VIT as VIT
from PIL import Image

from spiq.ui import state, tab_attention
from spiq.ui.page import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]

EMPTY_TABLE = {"headers": [], "data": []}


def _png(fig) -> str:
    from gradio.processing_utils import encode_plot_to_base64

    return encode_plot_to_base64(fig, "png")


def _pixels(data_url: str) -> np.ndarray:
    import base64
    import io

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_the_page_is_drawn_with_the_default_predictions(app):
    """The predictions written into the page are those a request for the default state returns."""
    from spiq.config import QuantConfig
    from spiq.models.data import open_image
    from spiq.ui.page import EXAMPLES, first_predictions

    module, _ = app
    fig, text = first_predictions(state.CACHE)
    want = module.page.predict(DEFAULT_MODEL, QuantConfig().to_json(), open_image(Path(EXAMPLES[0])))
    want_fig, want_text = want[module.page.pred_plot], want[module.page.pred_text]
    assert text == want_text and "logit SQNR" in text
    assert _pixels(_png(fig)).tolist() == _pixels(_png(want_fig)).tolist()
    served = {c["id"]: c.get("props", {}).get("value") for c in module.demo.config["components"]}
    pred_text = next(c["id"] for c in module.demo.config["components"] if c.get("props", {}).get("elem_id") == "pred-text")
    assert served[pred_text] == text


def _apply(client, method, wbits, abits, image, bias_fit=True):
    return client.predict(method, wbits, abits, "channel", "method default", bias_fit, EMPTY_TABLE, handle_file(image),
                          api_name="/apply")


@pytest.mark.slow   # a heavy end-to-end job
def test_concurrent_users_each_get_their_own_config(app, tmp_path):
    import spiq
    from spiq.analysis import layers as analysis
    from spiq.ui import plots, views
    from spiq.core.metrics import parameter_checksum
    from spiq.config import QuantConfig
    from spiq.models.data import open_image

    module, url = app
    float_model = state.CACHE.load(DEFAULT_MODEL).model
    before = parameter_checksum(float_model)
    jobs = [("spiq", 8, 4, "cat.jpg"), ("static-tensor", 8, 4, "cat.jpg"), ("dynamic-channel", 8, 4, "coffee.jpg"),
            ("spiq", 4, 8, "rocket.jpg"), ("calib-mse", 8, 5, "cat.jpg"), ("dynamic-tensor", 6, 6, "astronaut.jpg"),
            ("spiq", 8, 3, "camera.jpg"), ("static-tensor", 5, 5, "coffee.jpg"), ("spiq", 8, 8, "rocket.jpg")]

    def user(job):
        method, w, a, img = job
        client = Client(url, verbose=False)
        out = _apply(client, method, w, a, str(ROOT / "assets" / img))
        # a second request in the same session sees that session's recipe
        again = client.predict(handle_file(str(ROOT / "assets" / img)), api_name="/predict")
        return out, again

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(user, jobs))

    # what the library computes for each config on its own, outside the app and its cache (the
    # calibration images are the app's: the examples)
    model, preprocess, classes = spiq.load_model(DEFAULT_MODEL)
    calib = state.CACHE.calibration(DEFAULT_MODEL)
    for (method, w, a, img), (out, again) in zip(jobs, results):
        applied = json.loads(out[1])   # outputs: table, recipe, download, status, plot, text
        assert applied == {"version": 1, "method": method, "weight_bits": w, "input_bits": a}
        config = QuantConfig.from_dict(applied)
        qmodel = spiq.quantize(model, config, preprocess=preprocess,
                               calib_data=calib if config.needs_calibration else None)
        cmp = analysis.compare_predictions(model, qmodel, preprocess(open_image(ROOT / "assets" / img)), classes)
        expected = views._describe(cmp)
        assert out[-1] == expected, (method, w, a, img)
        assert again[-1] == expected
        # the figure too: the same pixels as the library's figure of these predictions
        assert _pixels(out[-2]["plot"]).tolist() == _pixels(_png(plots.predictions(cmp))).tolist()
    assert parameter_checksum(float_model) == before


def test_views_leave_the_shared_float_model_untouched(app):
    from spiq.core.metrics import parameter_checksum

    module, url = app
    model = state.CACHE.load(DEFAULT_MODEL).model
    before = parameter_checksum(model)
    client = Client(url, verbose=False)
    _apply(client, "spiq", 8, 4, str(ROOT / "assets" / "cat.jpg"))
    out = client.predict(handle_file(str(ROOT / "assets" / "cat.jpg")), None, None, None, "integrated-gradients", 11,
                         api_name="/refresh")
    assert out[-2] == tab_attention.NO_ATTENTION   # a CNN has no attention view
    assert "input_bits\": 4" in out[-1]
    assert client.predict(handle_file(str(ROOT / "assets" / "cat.jpg")), "grad-cam", api_name="/attribution")
    assert parameter_checksum(model) == before


def _bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose header claims 30000x30000 pixels: decoding it would take ~900 MB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + chunk(b"IEND", b""))


BAD_FILES = {
    "corrupt.jpg": (ROOT / "assets" / "cat.jpg").read_bytes()[:400],
    "empty.png": b"",
    "notes.png": b"this is plain text, not an image\n" * 10,
    "bomb.png": _bomb_png(),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_uploads_are_clear_errors_and_the_session_survives(app, tmp_path, name):
    from gradio_client.exceptions import AppError

    _, url = app
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(path)), api_name="/predict")
    msg = str(err.value)
    assert "cannot be used" in msg
    expected = {"corrupt.jpg": "corrupt or truncated", "empty.png": "empty", "notes.png": "not an image",
                "bomb.png": "too large"}[name]
    assert expected in msg
    # the same session goes on working
    ok = client.predict(handle_file(str(ROOT / "assets" / "coffee.jpg")), api_name="/predict")
    assert "espresso" in ok[-1]


def _odd_images(tmp_path) -> dict[str, Path]:
    rgb = Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB").resize((300, 200))
    out = {}

    def save(name, img, **kw):
        out[name] = tmp_path / name
        img.save(out[name], **kw)

    save("grey.png", rgb.convert("L"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("palette.gif", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("sixteen.png", Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the viewer must turn it 90 degrees
    save("rotated.jpg", rgb.rotate(90, expand=True), exif=exif.tobytes())
    save("tiny.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    return out


def test_odd_but_valid_images_are_converted(app, tmp_path):
    _, url = app
    client = Client(url, verbose=False)
    for name, path in _odd_images(tmp_path).items():
        fig, text = client.predict(handle_file(str(path)), api_name="/predict")
        assert "Float: **" in text and "logit SQNR" in text, name
    # the EXIF-rotated coffee cup is turned upright before the model sees it
    _, text = client.predict(handle_file(str(tmp_path / "rotated.jpg")), api_name="/predict")
    assert "espresso" in text


@pytest.mark.parametrize("recipe, field", [
    ("{not json", "not valid JSON"),
    ('{"method": "spiq", "weight_bits": 40, "input_bits": 4}', "weight_bits"),
    ('{"method": "spik"}', "method"),
    ('{"method": "spiq", "wbits": 8}', "wbits"),
    ('{"overrides": {"blocks.9.9.conv_pw": {"skip": true}}}', "blocks.9.9.conv_pw"),
    ('{"overrides": {"conv_head": {"input_bits": 1}}}', "input_bits"),
    ('[1, 2, 3]', "JSON object"),
])
def test_bad_recipes_name_the_field(app, tmp_path, recipe, field):
    from gradio_client.exceptions import AppError

    _, url = app
    path = tmp_path / "recipe.json"
    path.write_text(recipe)
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=field):
        client.predict(handle_file(str(path)), api_name="/load_recipe")


def test_uploaded_recipe_keeps_what_has_no_control(app, tmp_path):
    from gradio_client.exceptions import AppError

    module, url = app
    recipe = {"method": "spiq", "weight_bits": 8, "input_bits": 5, "weight_clip": "mse", "fold": "always",
              "equalize": True, "tail": "t6", "bias_images": 0,
              "overrides": {"blocks.1.0.conv_pw": {"weight_granularity": "tensor"}}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    client = Client(url, verbose=False)
    restored = client.predict(handle_file(str(path)), api_name="/load_recipe")
    assert tuple(restored[:6]) == ("spiq", 8, 5, "channel", "method default", False)   # bias fit off
    # the page applies an uploaded recipe at once; the client takes the same step
    out = client.predict(*restored[:6], restored[6], handle_file(str(ROOT / "assets" / "cat.jpg")), api_name="/apply")
    assert json.loads(out[1]) == {"version": 1, **recipe}
    # a recipe for another kind of model is refused before the session takes it
    path.write_text(json.dumps({"method": "liu-ptq", "weight_bits": 8, "input_bits": 8}))
    with pytest.raises(AppError, match="vision transformers"):
        client.predict(handle_file(str(path)), api_name="/load_recipe")
    _, text = client.predict(handle_file(str(ROOT / "assets" / "coffee.jpg")), api_name="/predict")
    assert "espresso" in text
    assert json.loads(client.predict("spiq", 8, 5, "channel", "method default", False, EMPTY_TABLE,
                                     handle_file(str(ROOT / "assets" / "cat.jpg")), api_name="/apply")[1]) == \
        {"version": 1, **recipe}


def test_bias_fit_box_switches_the_distilled_bias_fit(app):
    from spiq.config import QuantConfig

    module, url = app
    client = Client(url, verbose=False)
    cat = str(ROOT / "assets" / "cat.jpg")
    off = json.loads(_apply(client, "spiq", 8, 5, cat, bias_fit=False)[1])
    assert off == {"version": 1, "method": "spiq", "weight_bits": 8, "input_bits": 5, "bias_images": 0}
    assert state.CACHE.quantized(DEFAULT_MODEL, QuantConfig.from_dict(off)).report.bias_images == 0
    on = json.loads(_apply(client, "spiq", 8, 5, cat)[1])
    assert on == {"version": 1, "method": "spiq", "weight_bits": 8, "input_bits": 5}   # back to automatic
    assert state.CACHE.quantized(DEFAULT_MODEL, QuantConfig.from_dict(on)).report.bias_images == 8


def test_recipe_round_trip_with_per_layer_table(app, tmp_path):
    module, url = app
    client = Client(url, verbose=False)
    out = _apply(client, "spiq", 8, 4, str(ROOT / "assets" / "cat.jpg"))
    table = out[0]
    rows = table["data"]
    names = [r[0] for r in rows]
    rows[names.index("conv_head")][5] = 8              # input bits of one layer
    rows[names.index("classifier")][7] = True          # keep the classifier float
    out = client.predict("spiq", 8, 4, "channel", "method default", True, {"headers": table["headers"], "data": rows},
                         handle_file(str(ROOT / "assets" / "cat.jpg")), api_name="/apply")
    applied = json.loads(out[1])
    assert applied["overrides"] == {"conv_head": {"input_bits": 8}, "classifier": {"skip": True}}
    # the downloadable recipe is that config, and uploading it restores it
    downloaded = Path(out[2])
    assert json.loads(downloaded.read_text()) == applied
    restored = Client(url, verbose=False).predict(handle_file(str(downloaded)), api_name="/load_recipe")
    assert tuple(restored[:6]) == ("spiq", 8, 4, "channel", "method default", True)
    rows = {r[0]: r for r in restored[6]["data"]}
    assert rows["conv_head"][5] == 8 and rows["classifier"][7] is True and rows["blocks.0.0.conv_pw"][5] == 4


def test_unavailable_model_is_refused_and_the_session_keeps_its_model(app):
    module, url = app
    from spiq.models.registry import loadable

    offline = [n for n in ("resnet18", "mobilenet_v2") if loadable(n) is not None]
    if not offline:
        pytest.skip("torchvision weights are cached or downloadable here: nothing is unavailable")
    client = Client(url, verbose=False)
    out = client.predict(offline[0], "spiq", 8, 4, "channel", "method default", True, api_name="/select_model")
    assert out[0] == DEFAULT_MODEL  # the dropdown goes back to the model in use
    fig, text = client.predict(handle_file(str(ROOT / "assets" / "coffee.jpg")), api_name="/predict")
    assert "espresso" in text


@pytest.mark.slow   # a heavy end-to-end job
def test_deploy_exports_runs_and_times_the_recipe(app):
    from gradio_client.exceptions import AppError

    _, url = app
    client = Client(url, verbose=False)
    cat = str(ROOT / "assets" / "cat.jpg")
    _apply(client, "spiq", 8, 8, cat)
    latency, parity, text, onnx_file = client.predict(handle_file(cat), api_name="/deploy")
    assert "SPIQ int8" in text and "ORT static int8" in text and "CPU:" in text
    assert "real int8 **" in text and Path(onnx_file).stat().st_size > 1_000_000
    import onnx

    ops = {n.op_type for n in onnx.load(onnx_file).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # 4-bit inputs have no uint8 kernel: a clear refusal, and the session goes on
    _apply(client, "spiq", 8, 4, cat)
    with pytest.raises(AppError, match="cannot be exported to int8.*8-bit inputs"):
        client.predict(handle_file(cat), api_name="/deploy")
    assert "logit SQNR" in client.predict(handle_file(cat), api_name="/predict")[-1]


@pytest.mark.slow   # a heavy end-to-end job
def test_transformer_liu_ptq_and_attention_maps(app):
    """A ViT in the app: liu-ptq offered, every view computed, attention maps as the library gives them."""
    from spiq.analysis import layers as analysis
    from spiq.ui import views
    from spiq.config import QuantConfig
    from spiq.models.data import open_image

    module, url = app
    client = Client(url, verbose=False)
    cat = str(ROOT / "assets" / "cat.jpg")
    out = client.predict(VIT, "liu-ptq", 6, 6, "channel", "method default", True, api_name="/select_model")
    assert out[0] == VIT and "liu-ptq" in out[2] and out[3] == "liu-ptq"   # model, table, status, method
    applied = _apply(client, "liu-ptq", 6, 6, cat)[1]   # table, recipe, download, status, plot, text
    assert json.loads(applied)["method"] == "liu-ptq"
    views_out = client.predict(handle_file(cat), None, None, None, "grad-cam", 1, api_name="/refresh")
    assert "reverse" in views_out[-2] and "liu-ptq" in views_out[-1]
    _, table = client.predict(handle_file(cat), api_name="/methods")   # drawn when its tab is shown
    assert "liu-ptq" in [row[0] for row in table["data"]]
    maps, inversions, text = client.predict(handle_file(cat), 0, api_name="/attention")
    config = QuantConfig.from_json(applied)
    sc = views.scene(state.CACHE, VIT, config, open_image(cat))
    am = analysis.attention_maps(sc.loaded.model, sc.qmodel, sc.x, 0)
    reversed_pairs, pairs = am.inversions[0]
    assert f"**{reversed_pairs:,}** of {pairs:,}" in text and reversed_pairs > 0
    # a CNN takes no liu-ptq: switching back drops it from the choices
    out = client.predict(DEFAULT_MODEL, "liu-ptq", 6, 6, "channel", "method default", True, api_name="/select_model")
    assert out[0] == DEFAULT_MODEL and out[3] == "spiq" and '"method": "spiq"' in out[2]


class _ProgressRecorder:
    """Stands in for gr.Progress: what a handler would show in the browser's progress bar."""

    def __init__(self):
        self.updates: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None, **_):
        self.updates.append((float(fraction), desc))


def test_long_handlers_report_progress(app):
    from spiq.config import QuantConfig
    from spiq.models.data import open_image
    from spiq.quantize.memo import quantizable_layers

    module, _ = app
    cat = open_image(str(ROOT / "assets" / "cat.jpg"))
    # bits no other test applies, so the quantization really runs instead of coming from the cache
    bar = _ProgressRecorder()
    page = module.page   # the handlers answer {component: update}
    applied = page.apply(DEFAULT_MODEL, QuantConfig().to_json(), "spiq", 7, 3, "channel", "method default",
                         True, None, cat, progress=bar)[page.applied]
    fractions = [f for f, _ in bar.updates]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1.0
    layers = [d for _, d in bar.updates if d.startswith("quantizing ")]
    names = quantizable_layers(state.CACHE.load(DEFAULT_MODEL).model)
    assert len(layers) >= 5 and {d.split()[1] for d in layers} <= set(names)
    assert len(bar.updates) <= 13   # throttled: every update is a message to the browser

    bar = _ProgressRecorder()
    out = page.view_events.refresh(DEFAULT_MODEL, applied, cat, progress=bar, range_layer=None, map_layer=None,
                                   channel=None, attr_method="grad-cam", block=None)
    assert [d for _, d in bar.updates] == ["quantizing", "story", "channel ranges", "layer error", "error map",
                                           "attribution", "attention"]
    assert '"input_bits": 3' in out[page.views_note]
