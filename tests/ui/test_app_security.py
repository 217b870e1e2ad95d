"""The public app against hostile or careless clients: raw payloads, oversized and extreme images,
malformed control values, and the disk it may use."""
import base64
import io
import json
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from spiq.ui import state

ROOT = Path(__file__).resolve().parents[2]
CAT = str(ROOT / "assets" / "cat.jpg")
EMPTY_TABLE = {"headers": [], "data": []}


def _raw(url: str, api: str, data: list) -> tuple[str, dict | list]:
    """POST `data` to an endpoint as any HTTP client can, bypassing gradio_client's file handling:
    (event, payload) of the answer."""
    url = url.rstrip("/")
    req = urllib.request.Request(f"{url}/gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                 headers={"content-type": "application/json"})
    event_id = json.load(urllib.request.urlopen(req, timeout=60))["event_id"]
    stream = urllib.request.urlopen(f"{url}/gradio_api/call/{api}/{event_id}", timeout=120).read().decode()
    event = stream.split("event: ", 1)[1].split("\n", 1)[0]
    payload = json.loads(stream.split("data: ", 1)[1].split("\n", 1)[0])
    return event, payload


def _outside_files(tmp_path) -> list[str]:
    """Paths a client has no business opening: a real image outside the upload folder, a directory,
    a missing file, a non-image, an empty file, and a symlink from an allowed folder to outside."""
    image = tmp_path / "secret.jpg"
    image.write_bytes(Path(CAT).read_bytes())
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return [str(image), "/etc", "/etc/hosts", str(tmp_path / "missing.jpg"), str(empty), "/proc/self/environ"]


def test_server_files_are_never_opened_whatever_the_payload_says(app, tmp_path):
    module, url = app
    refusals = {"plain": set(), "meta": set()}
    for path in _outside_files(tmp_path):
        for kind, api, data in (("plain", "predict", [{"path": path}]),
                                ("plain", "error_map", [{"path": path}, "logits", None]),
                                ("meta", "predict", [{"path": path, "meta": {"_type": "gradio.FileData"}}])):
            event, payload = _raw(url, api, data)
            assert event == "error", (api, path, payload)
            refusals[kind].add(payload["error"])
    # one message for every refused file (Gradio's own check, with `meta`, answers without one):
    # nothing about what exists, and no server path
    assert refusals["meta"] == {None}, refusals
    assert len(refusals["plain"]) == 1, refusals
    message = refusals["plain"].pop()
    assert "/" not in message and "secret" not in message
    # a symlink planted inside the upload folder that points outside is refused as well
    from gradio.utils import get_upload_folder

    link = Path(get_upload_folder()) / "spiq-test-link.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(_outside_files(tmp_path)[0])
    try:
        assert _raw(url, "predict", [{"path": str(link)}])[1]["error"] == message
    finally:
        link.unlink()
    # the shipped examples stay usable by path, as the page's Examples send them
    event, _ = _raw(url, "predict", [{"path": CAT}])
    assert event == "complete"


def _png_bytes(size, colour=(120, 40, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_data_urls_are_held_to_the_upload_limit(app):
    from spiq.models.data import MAX_IMAGE_BYTES

    _, url = app
    small = "data:image/png;base64," + base64.b64encode(_png_bytes((64, 64))).decode()
    assert _raw(url, "predict", [{"path": None, "url": small}])[0] == "complete"
    # an image over the limit in a data URL is refused before it is decoded
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1024)).decode()
    event, payload = _raw(url, "predict", [{"path": None, "url": big}])
    assert event == "error" and "limit" in payload["error"]
    for bad in ("data:image/png;base64,@@@not-base64@@@", "data:image/png", "data:text/plain,hello"):
        event, payload = _raw(url, "predict", [{"path": None, "url": bad}])
        assert event == "error" and "data URL" in payload["error"], bad


@pytest.mark.parametrize("size", [(100_000, 10), (10, 30_000), (20_000, 1_000)])
def test_extreme_aspect_ratios_are_refused_before_any_resize(app, tmp_path, size):
    _, url = app
    path = tmp_path / "strip.png"
    path.write_bytes(_png_bytes(size))
    assert path.stat().st_size < 200_000   # tiny files: the pixel count alone would let them through
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="at most 20 times|no side may exceed"):
        client.predict(handle_file(str(path)), api_name="/predict")


@pytest.mark.parametrize("wbits, abits, bias_fit, expected", [
    (8.5, 8, True, "Weight bits must be a whole number"),
    (8, 7.9, True, "Input bits must be a whole number"),
    ("8", 8, True, "Weight bits"),
    (None, 8, True, "Weight bits"),
    (8, 20, True, "Input bits must be a whole number from 2 to 16"),
    (8, 8, "yes", "Bias fit must be true or false"),
])
def test_control_values_are_checked_by_name_and_the_recipe_is_kept(app, wbits, abits, bias_fit, expected):
    _, url = app
    client = Client(url, verbose=False)
    applied = client.predict("spiq", 8, 5, "channel", "method default", True, EMPTY_TABLE, handle_file(CAT),
                             api_name="/apply")
    assert json.loads(applied[1])["input_bits"] == 5
    with pytest.raises(AppError, match=expected):
        client.predict("spiq", wbits, abits, "channel", "method default", bias_fit, EMPTY_TABLE, handle_file(CAT),
                       api_name="/apply")
    # the session still has its recipe: W8A5
    assert "input_bits\": 5" in client.predict(handle_file(CAT), None, None, None, "grad-cam", 11,
                                               api_name="/refresh")[-1]


def test_nan_bits_are_refused_by_name(app):
    _, url = app   # JSON clients refuse to send NaN; raw HTTP does not
    event, payload = _raw(url, "apply", ["spiq", float("nan"), 8, "channel", "method default", True, EMPTY_TABLE,
                                         {"path": CAT}])
    assert event == "error" and "Weight bits must be a whole number" in payload["error"]


def test_nested_and_oversized_recipes_are_refused(app, tmp_path):
    _, url = app
    client = Client(url, verbose=False)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200_000)
    with pytest.raises(AppError, match="nested more than"):
        client.predict(handle_file(str(nested)), api_name="/load_recipe")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"method": "spiq", "note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(AppError, match="not UTF-8 text"):
        client.predict(handle_file(str(latin)), api_name="/load_recipe")
    big = tmp_path / "big.json"
    big.write_text('{"method": "spiq", "x": "' + "a" * 1_100_000 + '"}')
    with pytest.raises(AppError, match="small JSON file"):
        client.predict(handle_file(str(big)), api_name="/load_recipe")


def test_the_same_recipe_is_written_once(app):
    module, url = app
    client = Client(url, verbose=False)
    before = set(state.RECIPES.root.iterdir())
    for _ in range(3):
        out = client.predict("static-tensor", 7, 7, "tensor", "method default", True, EMPTY_TABLE, handle_file(CAT),
                             api_name="/apply")
    new = set(state.RECIPES.root.iterdir()) - before
    assert len(new) <= 1 and json.loads(Path(out[2]).read_text())["weight_bits"] == 7


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_disk_use_stays_bounded_over_20_deploys(app, tmp_path):
    """Twenty different exportable recipes through Deploy: the exports folder keeps a bounded number,
    Gradio's cache gets no copies of them, and each download link is the live file."""
    from gradio.utils import get_upload_folder

    module, url = app
    client = Client(url, verbose=False, download_files=str(tmp_path))   # not into the server's folder
    cache = Path(get_upload_folder())
    cache_before = _du(cache)
    recipes = [(m, w, fit) for m in ("spiq", "static-tensor") for w in (8, 7, 6, 5, 4) for fit in (True, False)]
    sizes = []
    for method, wbits, fit in recipes:
        client.predict(method, wbits, 8, "channel", "method default", fit, EMPTY_TABLE, handle_file(CAT),
                       api_name="/apply")
        *_, onnx_file = client.predict(handle_file(CAT), api_name="/deploy")
        assert Path(onnx_file).stat().st_size > 1_000_000
        sizes.append(state.EXPORTS.size())
    entries = list(state.EXPORTS.root.iterdir())
    assert len(entries) <= state.EXPORTS.max_entries
    one = max(p.stat().st_size for p in state.EXPORTS.root.rglob("*.onnx"))
    assert max(sizes) <= (state.EXPORTS.max_entries + 3) * one   # + the model's three baselines
    assert _du(cache) - cache_before < 2 * one   # downloads are served in place, not copied
