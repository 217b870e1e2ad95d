"""The public app against a hostile visitor: every request's cost bounded before work, every echo
shown as text, request bodies bounded, URL payloads refused, malformed fields named."""
import http.client
import json
import re
import threading
import time
import urllib.parse
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import APP_CNN
from test_app_security import CAT, EMPTY_TABLE, _raw

from spiq.config import QuantConfig
from spiq.ui import echo, limits, state
from spiq.ui.page import DEFAULT_MODEL

HOSTILE = ['<img src="https://evil.example/x.png" onerror="alert(1)">',
           "<a href='https://evil.example'>click</a>",
           '<form action="https://evil.example"><input type="password" name="p"></form>',
           '<div style="position:fixed;inset:0;background:url(https://evil.example/x)">',
           "</script><script>alert(1)</script>",
           "[log in](https://evil.example) ![x](https://evil.example/x.png) **bold** `code`"]


class _Query:
    def __init__(self, **params):
        self.query_params = params


def _open_link(monkeypatch, page, **params) -> tuple[dict, list[str]]:
    """open_link as a page load with these query parameters: ({component: update}, the warnings it raised)."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, **kw: warnings.append(message))
    return page.open_link(DEFAULT_MODEL, _Query(**params)), warnings


@pytest.mark.parametrize("payload", HOSTILE)
def test_echoes_show_a_payload_as_text(payload):
    for shown in (echo.plain(payload), echo.markdown(payload)):
        assert "<" not in shown and ">" not in shown.replace("\\>", "")
    # Markdown can neither link nor embed: its brackets, parentheses and autolink colons are escaped
    shown = echo.markdown(payload)
    assert not re.search(r"(?<!\\)[\[\]()]", shown) and not re.search(r"(?<!\\):", shown), shown
    span = echo.code(payload + "``` more")
    fence = span.split(" ", 1)[0]
    assert set(fence) == {"`"} and span.endswith(" " + fence) and fence not in span[len(fence):-len(fence)]


def test_closing_tags_are_not_taken_for_server_paths():
    assert echo.without_paths("at /srv/app/spiq/ui/views.py") == "at views.py"
    assert echo.without_paths("</script> and https://host/a/b") == "</script> and https://host/a/b"


@pytest.mark.parametrize("payload", HOSTILE[:3])
def test_a_hostile_link_is_a_plain_text_warning_and_the_default_page(app, monkeypatch, payload):
    module, _ = app
    out, warnings = _open_link(monkeypatch, module.page, recipe=json.dumps({"method": payload}))
    assert len(warnings) == 1 and "<" not in warnings[0] and "method" in warnings[0]
    assert "&lt;" in warnings[0]   # shown, as text
    assert out == {module.page.linked: False}   # the page keeps its default state


@pytest.mark.parametrize("recipe, field", [({"bias_images": 256}, "bias_images"), ({"bias_images": 32}, "bias_images"),
                                           ({"method": "liu-ptq", "search_points": 100_000}, None),
                                           ({"calib_images": 5000}, "calib_images")])
def test_links_asking_for_work_beyond_the_public_limits_are_refused_at_once(app, monkeypatch, recipe, field):
    module, _ = app
    start = time.monotonic()
    out, warnings = _open_link(monkeypatch, module.page, recipe=json.dumps(recipe))
    assert time.monotonic() - start < 5   # distilling 256 images took minutes and 8 GB
    assert len(warnings) == 1 and out == {module.page.linked: False}
    assert (field or "vision transformers") in warnings[0]


def test_recipe_limits_name_the_field():
    limits.check_recipe(QuantConfig())
    with pytest.raises(limits.ConfigError, match="search_points: the public app runs at most 100; got 101"):
        limits.check_recipe(QuantConfig(search_points=101))


def test_an_uploaded_recipe_needing_undistilled_images_is_refused_and_the_session_kept(app, tmp_path):
    _, url = app
    client = Client(url, verbose=False)
    applied = client.predict("spiq", 8, 5, "channel", "method default", True, EMPTY_TABLE, handle_file(CAT),
                             api_name="/apply")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"method": "spiq", "bias_images": 256}))
    start = time.monotonic()
    with pytest.raises(AppError, match="bias_images"):
        client.predict(handle_file(str(path)), api_name="/load_recipe")
    assert time.monotonic() - start < 10
    assert json.loads(applied[1])["input_bits"] == 5
    assert '"input_bits": 5' in client.predict(handle_file(CAT), None, None, None, "grad-cam", 11,
                                               api_name="/refresh")[-1]


def test_a_model_without_distilled_images_is_never_distilled_in_a_request(app, monkeypatch):
    from conftest import without_fit_images

    module, url = app
    without_fit_images(monkeypatch, state.CACHE, APP_CNN)
    monkeypatch.setattr(state.BACKGROUND, "jobs", {})   # and nothing distils it in the background
    client = Client(url, verbose=False)
    selected = client.predict(APP_CNN, "spiq", 8, 8, "channel", "method default", True, api_name="/select_model")
    assert selected[0] == APP_CNN and selected[4] is False   # opened with the fit off
    start = time.monotonic()
    with pytest.raises(AppError, match="bias_images"):
        client.predict("spiq", 8, 8, "channel", "method default", True, EMPTY_TABLE, handle_file(CAT),
                       api_name="/apply")
    assert time.monotonic() - start < 10
    assert not state.CACHE.fit_ready(APP_CNN)


def test_admission_waits_then_refuses_and_counts_nested_work_once():
    gate = limits.Admission(budget=100, wait_s=0.3)
    with gate.admit(60):
        with gate.admit(60):   # nested in admitted work: part of its estimate
            assert gate.in_flight == 60
        errors = []
        thread = threading.Thread(target=lambda: _try(gate, 60, errors))
        thread.start()
        thread.join()
        assert errors and isinstance(errors[0], limits.ServerBusy)
        done = []
        thread = threading.Thread(target=lambda: _try(gate, 40, done))
        thread.start()
        thread.join()
        assert done == ["ran"]
    with gate.admit(500):   # larger than the budget: runs alone
        assert gate.peak == 500


def _try(gate, cost, out):
    try:
        with gate.admit(cost):
            out.append("ran")
    except limits.ServerBusy as exc:
        out.append(exc)


def test_the_footprint_of_lite0_weighs_weights_and_activations(lite0):
    fp = limits.footprint(lite0, (3, 224, 224))
    assert 15 << 20 < fp.weight_bytes < 25 << 20               # 4.7 M parameters and BN buffers, float32
    assert 50 << 20 < fp.activation_bytes < 200 << 20           # every layer's output for one image
    assert fp.cost(256) > 20 << 30 > fp.cost(8)                 # what bias_images 256 would have asked


def test_a_full_server_refuses_views_as_busy_but_keeps_predicting(app, monkeypatch):
    module, url = app
    gate = limits.Admission(budget=1, wait_s=0.5)
    monkeypatch.setattr(state, "ADMISSION", gate)
    client = Client(url, verbose=False)
    client.predict("spiq", 8, 6, "channel", "method default", True, EMPTY_TABLE, handle_file(CAT), api_name="/apply")
    held = threading.Event(), threading.Event()

    def busy():
        with gate.admit(10):
            held[0].set()
            held[1].wait(30)

    thread = threading.Thread(target=busy)
    thread.start()
    held[0].wait(10)
    try:
        with pytest.raises(AppError, match="busy"):
            client.predict(handle_file(CAT), None, api_name="/ranges")
        _, text = client.predict(handle_file(str(Path(CAT).with_name("coffee.jpg"))), api_name="/predict")
        assert "espresso" in text   # the applied recipe is cached: predictions never wait for work
    finally:
        held[1].set()
        thread.join()


def test_ranges_and_law_answer_a_fresh_api_session(app):
    _, url = app
    client = Client(url, verbose=False)
    fig = client.predict(handle_file(CAT), None, api_name="/ranges")
    assert fig is not None and "input ranges" in json.dumps(fig)
    channel, hist, _, text = client.predict(handle_file(CAT), None, api_name="/law")
    assert isinstance(channel, (int, float)) and hist is not None and "Channel" in text
    layer = "blocks.5.0.conv_pwl"   # a layer named by a client that never saw the dropdown's choices
    assert layer in json.dumps(client.predict(handle_file(CAT), layer, api_name="/ranges"))
    with pytest.raises(AppError, match="not a quantized layer"):
        client.predict(handle_file(CAT), "blocks.99.conv", api_name="/ranges")


@pytest.mark.parametrize("budget, expected", [(None, "number of bits"), ("4.5", "number of bits"),
                                              ([4.5], "number of bits"), ("x", "number of bits"),
                                              (4.3, "steps of 0.25"), (9, "from 4 to 8")])
def test_advisor_budgets_are_named(app, budget, expected):
    _, url = app
    event, payload = _raw(url, "advisor", [budget])
    assert event == "error" and expected in payload["error"], payload


@pytest.mark.parametrize("table", [{"headers": [], "data": "notalist"}, {"headers": [], "data": None},
                                   {"headers": ["layer"] * 8, "data": [[{"a": 1}] * 8]}, "notalist", None])
def test_malformed_layer_tables_are_named(app, table):
    _, url = app
    event, payload = _raw(url, "apply", ["spiq", 8, 8, "channel", "method default", True, table, {"path": CAT}])
    assert event == "error" and payload["error"] and "table" in payload["error"], payload


def test_a_5000_digit_bit_width_is_named(app, tmp_path):
    _, url = app
    client = Client(url, verbose=False)
    path = tmp_path / "recipe.json"
    path.write_text('{"weight_bits": ' + "9" * 5000 + "}")
    with pytest.raises(AppError, match="weight_bits must be an integer from 2 to 16, got a 5000-digit number"):
        client.predict(handle_file(str(path)), api_name="/load_recipe")
    event, payload = _raw(url, "apply", ["spiq", int("9" * 1000), 8, "channel", "method default", True, EMPTY_TABLE,
                                         {"path": CAT}])
    assert event == "error" and "Weight bits" in payload["error"], payload


def _post(url: str, path: str, length: int, body: bytes = b"{}") -> tuple[int, float]:
    """(status, seconds) of a POST that announces `length` bytes and sends `body`."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    start = time.monotonic()
    conn.putrequest("POST", path)
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(length))
    conn.endheaders()
    try:
        conn.send(body)
    except OSError:
        pass   # the server may answer and close before the body is sent
    status = conn.getresponse().status
    conn.close()
    return status, time.monotonic() - start


def test_request_bodies_are_bounded_before_they_are_read(app):
    from spiq.ui.server import MAX_BODY_BYTES

    _, url = app
    status, seconds = _post(url, "/gradio_api/call/predict", 300 << 20)
    assert status == 413 and seconds < 2
    status, _ = _post(url, "/gradio_api/upload", MAX_BODY_BYTES + 1)
    assert status == 413
    # a body without a length (chunked) is cut as it passes the bound
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunk = b"x" * (1 << 20)
    try:
        conn.request("POST", "/gradio_api/call/predict", body=iter([chunk] * (MAX_BODY_BYTES // len(chunk) + 4)),
                     headers={"content-type": "application/json"}, encode_chunked=True)
    except OSError:
        pass
    assert conn.getresponse().status == 413
    conn.close()
    # an ordinary call is untouched
    assert _raw(url, "predict", [{"path": CAT}])[0] == "complete"


def test_url_payloads_are_refused_and_never_fetched(app, monkeypatch):
    from gradio import processing_utils

    _, url = app
    fetched = []

    async def spy(url, cache_dir):
        fetched.append(url)
        raise AssertionError("fetched")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", spy)
    for target in ("https://upload.wikimedia.org/cat.jpg", "http://example.com/big.png"):
        event, payload = _raw(url, "predict", [{"path": target, "meta": {"_type": "gradio.FileData"}}])
        assert event == "error" and payload["error"] and "URLs" in payload["error"], payload
        event, payload = _raw(url, "load_recipe", [{"path": target, "meta": {"_type": "gradio.FileData"}}])
        assert event == "error" and "URLs" in (payload["error"] or ""), payload
    assert fetched == []
