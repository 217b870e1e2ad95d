"""The app in a real browser: Debian's Chromium driven by Playwright (no browser download needed)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

import pytest
from playwright import sync_api

from conftest import free_port, wait_serving
from spiq.ui import state
from spiq.ui.page import DEFAULT_MODEL

# A real browser against a served app: the slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPIQ_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
PLOTS = {"Story": ["story-plot"], "Channel ranges": ["ranges-plot"], "Law vs reality": ["law-plot", "spread-plot"],
         "Layer error": ["sqnr-plot", "breakdown-plot", "fold-plot"], "Error map": ["emap-plot"],
         "Attribution": ["attr-plot"], "Methods": ["methods-plot"], "Deploy": [], "Recipe": []}


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_serving(proc, port, lambda: proc.stdout.read(), timeout=90)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def _plot_traces(page, elem_id: str) -> int:
    sel = f"#{elem_id} .js-plotly-plot"
    page.wait_for_selector(sel, state="attached", timeout=60_000)
    # traces plotly actually drew: bars and lines (.trace), heatmaps (.hm) and images (<image>)
    return page.eval_on_selector(sel, "el => ((el._fullData || []).length > 0) * "
                                      "el.querySelectorAll('.trace, .hm, image').length")


# the prediction figure, a still image: drawn (decoded) and its source, which changes with the predictions
PRED_IMAGE = "(el => el.naturalWidth > 0 ? el.src : '')"


def _pred_image(page) -> str:
    page.wait_for_selector("#pred-plot img", state="attached", timeout=60_000)
    return page.eval_on_selector("#pred-plot img", PRED_IMAGE)


def _open_app(p, url: str, problems: list, args=(), permissions=()):
    """Chromium on the app's page, its console errors collected in `problems`."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SPIQ_CHROMIUM)")
    browser = p.chromium.launch(executable_path=CHROMIUM,
                                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args])
    page = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=list(permissions)).new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#pred-plot img", timeout=90_000)
    return browser, page


def test_app_in_chromium(app_url, tmp_path):
    problems = []
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, app_url, problems)

        # pick an example: the coffee cup
        page.locator("img[src*='coffee']").first.click()
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('espresso')", timeout=60_000)
        before, before_image = page.inner_text("#pred-text"), _pred_image(page)
        assert "top-1 kept" in before  # 8-bit inputs

        # input bits to 4, Apply: the recipe and the predictions change
        box = page.locator("#abits input[type=number]")
        box.fill("4")
        box.press("Enter")
        page.click("#apply")
        page.wait_for_function("document.querySelector('#status').innerText.includes('\"input_bits\": 4')",
                               timeout=60_000)
        page.wait_for_function(f"document.querySelector('#pred-text').innerText !== {before!r}", timeout=60_000)
        after = page.inner_text("#pred-text")
        assert after != before and "logit SQNR" in after
        page.wait_for_function(f"{PRED_IMAGE}(document.querySelector('#pred-plot img')) !== {before_image!r}",
                               timeout=30_000)   # the figure follows the text
        assert _pred_image(page).startswith("data:image/png")
        # after Apply the tab in view is drawn again (each other tab when it is opened)
        page.wait_for_function("document.querySelector('#views-note').innerText.includes('\"input_bits\": 4')",
                               timeout=120_000)

        for tab, plots in PLOTS.items():
            page.get_by_role("tab", name=tab).click()
            for elem_id in plots:
                assert _plot_traces(page, elem_id) > 0, f"{tab}: {elem_id} has no data"
                # presenters download figures as PNG from plotly's mode bar
                page.hover(f"#{elem_id} .js-plotly-plot")
                assert page.locator(f"#{elem_id} [data-title='Download plot as a PNG' i]").count() == 1
        page.get_by_role("tab", name="Attention").click()   # a CNN: the tab says why it is empty
        assert "vision transformers" in page.inner_text("#attention-text")
        page.get_by_role("tab", name="Story").click()
        shot = Path(os.environ.get("SPIQ_SCREENSHOT_DIR", tmp_path)) / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # the Methods tab is drawn while shown: after Apply when it is in view, and when it comes
        # into view after Applies made while it was not
        methods_title = "(document.querySelector('#methods-plot .gtitle') || {}).textContent || ''"

        def apply_input_bits(bits):
            box.fill(str(bits))
            box.press("Enter")
            page.click("#apply")
            page.wait_for_function(f"document.querySelector('#views-note').innerText.includes('\"input_bits\": {bits}')",
                                   timeout=120_000)
        page.get_by_role("tab", name="Methods").click()
        page.wait_for_function(f"({methods_title}).includes('W8A4')", timeout=60_000)
        apply_input_bits(5)
        page.wait_for_function(f"({methods_title}).includes('W8A5')", timeout=60_000)
        page.get_by_role("tab", name="Story").click()
        apply_input_bits(6)
        assert "W8A5" in page.evaluate(methods_title)   # not drawn while hidden
        page.get_by_role("tab", name="Methods").click()
        page.wait_for_function(f"({methods_title}).includes('W8A6')", timeout=60_000)
        browser.close()
    assert not problems, "\n".join(problems)


def test_webcam_and_clipboard_images_reach_the_models(app_url):
    """The image's other two sources: Chromium's fake camera, and a PNG pasted from the clipboard."""
    problems = []
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, app_url, problems, permissions=["camera", "clipboard-read", "clipboard-write"],
                                  args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('logit SQNR')", timeout=60_000)
        example = page.inner_text("#pred-text")
        assert "espresso" not in example   # the first example is the cat

        page.click("#image button[aria-label='Capture from camera']")
        page.click("#image [title='grant webcam access'] button")
        page.wait_for_function("document.querySelector('#image video').videoWidth > 0", timeout=30_000)
        frame_width = page.eval_on_selector("#image video", "v => v.videoWidth")
        page.click("#image button[aria-label='capture photo']")
        page.wait_for_function(f"(t => t.includes('logit SQNR') && t !== {example!r})"
                               "(document.querySelector('#pred-text').innerText)", timeout=60_000)
        # the models saw the captured frame itself, not the example left underneath
        assert page.eval_on_selector("#image img[src*='/file=']", "i => i.naturalWidth") == frame_width

        # a copied image: the coffee example drawn to PNG and put on the clipboard, then pasted
        page.evaluate("""async () => {
            const img = document.querySelector("img[src*='coffee']");
            const canvas = Object.assign(document.createElement('canvas'), {width: img.naturalWidth, height: img.naturalHeight});
            canvas.getContext('2d').drawImage(img, 0, 0);
            const png = await new Promise(resolve => canvas.toBlob(resolve, 'image/png'));
            await navigator.clipboard.write([new ClipboardItem({'image/png': png})]);
        }""")
        page.click("#image button[aria-label='Paste from clipboard']")
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('espresso')", timeout=60_000)
        browser.close()
    assert not problems, "\n".join(problems)


def _drop_file(page, path: Path, mime: str):
    """A file dragged from the desktop onto the image (a synthetic drop carrying it)."""
    files = page.evaluate_handle("""([bytes, name, mime]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
        return dt;
    }""", [list(path.read_bytes()), path.name, mime])
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event("#image .upload-container", event, {"dataTransfer": files})


def test_an_image_put_over_the_shown_one_is_predicted_once(app_url, tmp_path):
    """Gradio's image empties itself when a file starts uploading over a shown image, so `.change`
    fired twice, both requests carrying the new file: a refused file showed its error twice."""
    problems, joins = [], []
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(os.urandom(50_000))
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, app_url, problems)
        config = page.evaluate("() => fetch('config').then(r => r.json())")
        fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "predict")
        page.on("request", lambda r: joins.append((r.post_data_json or {}).get("fn_index"))
                if "/queue/join" in r.url else None)
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('logit SQNR')", timeout=60_000)
        joins.clear()

        # a corrupt file chosen while the cat is shown: one request, one error
        page.set_input_files("#image input[type=file]", str(bad))
        page.wait_for_selector("[data-testid=toast-body]", timeout=60_000)
        page.wait_for_timeout(3000)
        toasts = page.locator("[data-testid=toast-body]").all_inner_texts()
        assert joins.count(fn) == 1, joins
        assert len(toasts) == 1 and "cannot be used" in toasts[0] and "(2)" not in toasts[0], toasts

        # a photo dropped over it: one request, and the predictions are the photo's
        joins.clear()
        _drop_file(page, ROOT / "assets" / "coffee.jpg", "image/jpeg")
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('espresso')", timeout=60_000)
        page.wait_for_timeout(2000)
        assert joins.count(fn) == 1, joins

        # examples and Remove still reach the predictions
        page.locator("img[src*='cat']").first.click()
        page.wait_for_function("(t => t.includes('logit SQNR') && !t.includes('espresso'))"
                               "(document.querySelector('#pred-text').innerText)", timeout=60_000)
        page.click("#image button[aria-label='Remove Image']")
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('upload an image')",
                               timeout=30_000)
        browser.close()
    assert not [m for m in problems if "Bad image" not in m and "cannot be used" not in m], "\n".join(problems)


# the page shows predictions (the element may not exist yet right after navigation)
PREDICTED = "(document.querySelector('#pred-text') || {innerText: ''}).innerText.includes('logit SQNR')"


def test_views_are_computed_when_their_tab_is_shown(app):
    """On load and on Apply only the predictions and the tab in view are computed; another tab
    computes when it is opened; going back to a computed tab computes nothing."""
    module, url = app
    cache = state.CACHE
    names = {i: getattr(f, "name", "") for i, f in module.demo.fns.items()}
    problems, joins = [], []

    def new_views(before):
        return [k[3] for k in cache.view_keys() if k not in before]

    def joined(name):
        return sum(names.get(i) == name for i in joins)

    with sync_api.sync_playwright() as p:
        if not Path(CHROMIUM).exists():
            pytest.fail(f"Chromium not found at {CHROMIUM}")
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: joins.append((r.post_data_json or {}).get("fn_index"))
                if "/queue/join" in r.url else None)
        before = cache.view_keys()
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function(PREDICTED, timeout=90_000)
        assert _plot_traces(page, "story-plot") > 0   # the tab in view
        page.wait_for_timeout(1500)
        # the default page holds its predictions: the load's predict step computes nothing
        assert joined("predict_linked") == 1 and joined("predict") == 0, joins
        assert joined("compute_tab") <= 1 and joined("refresh") == 0, joins
        assert set(new_views(before)) <= {"story"}

        # a recipe no other test applies: Apply computes the predictions and the Story tab only
        joins.clear()
        before, computed = cache.view_keys(), cache.view_computes
        box = page.locator("#abits input[type=number]")
        box.fill("7")
        box.press("Enter")
        page.locator("#wbits input[type=number]").fill("6")
        page.locator("#wbits input[type=number]").press("Enter")
        page.click("#apply")
        page.wait_for_function("document.querySelector('#views-note').innerText.includes('\"input_bits\": 7')",
                               timeout=90_000)
        page.wait_for_timeout(1500)
        assert new_views(before) == ["story"] and cache.view_computes == computed + 1
        assert joined("apply") == 1 and joined("compute_tab") == 1, joins

        # another tab computes when it is opened
        before, computed = cache.view_keys(), cache.view_computes
        page.get_by_role("tab", name="Layer error").click()
        assert _plot_traces(page, "sqnr-plot") > 0
        page.wait_for_function("document.querySelector('#sqnr-plot .gtitle') !== null", timeout=60_000)
        assert new_views(before) == ["layer-error"] and cache.view_computes == computed + 1

        # going back to a computed tab, and forth again: nothing is computed, nothing is re-sent
        joins.clear()
        computed, hits = cache.view_computes, cache.view_hits
        for tab, plot in (("Story", "story-plot"), ("Layer error", "sqnr-plot")):
            start = time.perf_counter()
            page.get_by_role("tab", name=tab).click()
            assert _plot_traces(page, plot) > 0
            assert time.perf_counter() - start < 2.0
        page.wait_for_timeout(1500)
        assert joined("compute_tab") == 0 and cache.view_computes == computed and cache.view_hits == hits, joins

        # a new session with the first page's image and recipe gets its tab from the cache
        computed, hits = cache.view_computes, cache.view_hits
        page2 = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        page2.goto(url, wait_until="domcontentloaded")
        page2.wait_for_function(PREDICTED, timeout=90_000)
        assert _plot_traces(page2, "story-plot") > 0
        assert cache.view_computes == computed and cache.view_hits == hits + 1
        browser.close()
    assert not problems, "\n".join(problems)


def test_recipe_image_and_predictions_fit_one_1280x720_screen(app_url):
    """Presenting on a 1280x720 projector: the controls, the image and the predictions without scrolling."""
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(app_url, wait_until="domcontentloaded")
        page.wait_for_function(PREDICTED, timeout=90_000)
        assert _pred_image(page)
        page.wait_for_timeout(500)   # the layout settles
        page.screenshot(path=str(Path(os.environ.get("SPIQ_SCREENSHOT_DIR", "/tmp")) / "app_1280x720.png"))
        for elem in ("apply", "image", "pred-text", "pred-plot"):
            box = page.locator(f"#{elem}").bounding_box()
            assert box is not None and box["width"] > 0, elem
            assert 0 <= box["y"] and box["y"] + box["height"] <= 720, (elem, box)
            assert box["x"] + box["width"] <= 1280, (elem, box)
        assert page.evaluate("window.scrollY") == 0
        browser.close()
    assert not problems, "\n".join(problems)


def test_a_new_page_shows_its_predictions_without_a_request(app_url):
    """The default page is drawn with its predictions: they show with every queue request refused."""
    problems, refused = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.route("**/gradio_api/queue/**", lambda route: (refused.append(route.request.url), route.abort()))
        page.goto(app_url, wait_until="domcontentloaded")
        page.wait_for_function(PREDICTED, timeout=90_000)
        assert "Float: **" not in page.inner_text("#pred-text")   # rendered markdown, not its source
        assert _pred_image(page).startswith("data:image/png")
        page.wait_for_timeout(1000)
        assert refused, "the page sent no queue request: the refusal proved nothing"
        browser.close()
    assert not problems, "\n".join(problems)


def test_a_link_restores_the_recipe_and_the_example(app_url):
    """`?recipe=<flat JSON>&example=<file name>` restores the controls, the image and the views; bad
    values are refused by name, and the page opens in its default state."""
    from urllib.parse import quote

    recipe = '{"method": "static-tensor", "weight_bits": 6, "input_bits": 6}'
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1280, "height": 720},
                                      permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(f"{app_url}/?recipe={quote(recipe)}&example=rocket.jpg", wait_until="domcontentloaded")
        page.wait_for_function("(document.querySelector('#status') || {innerText: ''}).innerText"
                               ".includes('Restored from the link')", timeout=90_000)
        page.wait_for_function(PREDICTED, timeout=90_000)
        assert page.input_value("#method input") == "static-tensor"
        assert page.input_value("#wbits input[type=number]") == "6" and page.input_value("#abits input[type=number]") == "6"
        assert page.locator("#image img[src*='rocket']").count() == 1
        page.wait_for_function("(document.querySelector('#views-note') || {innerText: ''}).innerText"
                               ".includes('static-tensor')", timeout=90_000)
        # the link's predictions replace those the page was drawn with (the default example's)
        page.wait_for_function("document.querySelector('#pred-text').innerText.includes('missile')", timeout=60_000)
        assert "palace" not in page.inner_text("#pred-text") and _pred_image(page)
        # the Recipe tab shows the link to what is applied, absolute, ready to copy
        page.get_by_role("tab", name="Recipe").click()
        page.wait_for_function("document.querySelector('#share-link textarea').value.includes('example=rocket.jpg')",
                               timeout=30_000)
        link = page.input_value("#share-link textarea")
        assert link.startswith(app_url) and "static-tensor" in unquote_plus(link)
        assert page.locator("#share-link button[aria-label*='opy' i], #share-link button[title*='opy' i]").count() >= 1
        # the link opens the same state in a new page
        page2 = context.new_page()
        page2.goto(link, wait_until="domcontentloaded")
        page2.wait_for_function("(document.querySelector('#pred-text') || {innerText: ''}).innerText.includes('missile')",
                                timeout=90_000)
        assert page2.input_value("#method input") == "static-tensor"
        assert page2.locator("#image img[src*='rocket']").count() == 1

        bad_recipe = quote('{"method": "spik"}')
        for query, expected in ((f"recipe={bad_recipe}&example=rocket.jpg", "method"),
                                ("example=..%2Fapp.py", "no shipped example '../app.py'")):
            bad = context.new_page()
            bad.goto(f"{app_url}/?{query}", wait_until="domcontentloaded")
            toast = bad.wait_for_function("(document.querySelector('[data-testid=toast-body]') || {}).innerText",
                                          timeout=60_000).json_value()
            assert "cannot be opened" in toast and expected in toast, toast
            bad.wait_for_function(PREDICTED, timeout=90_000)
            assert bad.input_value("#method input") == "spiq"          # the default state
            first = (ROOT / "assets" / "examples.txt").read_text().split()[0]   # the default image
            assert bad.locator(f"#image img[src*='{first.rsplit('.', 1)[0]}']").count() == 1
            assert "/" not in toast.split("'../app.py'")[-1]   # no server path
        browser.close()
    assert not problems, "\n".join(problems)


def test_a_hostile_link_is_shown_as_text_never_as_markup(app_url):
    """A link's recipe echoed into the "Bad link" toast draws no image, link, form or overlay: the
    visitor reads the payload as text."""
    from urllib.parse import quote

    payload = ('<img id="pwn-img" src="https://evil.example/x.png"><a id="pwn-a" href="https://evil.example">log in</a>'
               '<form id="pwn-form"><input type="password"></form><div id="pwn-div" style="position:fixed;inset:0">')
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{app_url}/?recipe={quote(json.dumps({'method': payload}))}", wait_until="domcontentloaded")
        toast = page.wait_for_function("(document.querySelector('[data-testid=toast-body]') || {}).innerText",
                                       timeout=60_000).json_value()
        assert "cannot be opened" in toast and '<img id="pwn-img"' in toast, toast   # the text, as sent
        assert page.locator("#pwn-img, #pwn-a, #pwn-form, #pwn-div, [data-testid=toast-body] input").count() == 0
        browser.close()
    assert not [u for u in requests if urlsplit(u).hostname == "evil.example"]


def test_the_fit_note_says_when_a_models_background_images_are_ready(app, monkeypatch, tmp_path):
    """A model whose bias-fit images are still distilled in the background opens with the fit off
    and a note; the note says so when they are ready, without a reload."""
    from conftest import APP_CNN, cache_fit_images, without_fit_images
    from spiq.ui.background import READY, RUNNING, Job

    module, url = app
    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))
    without_fit_images(monkeypatch, state.CACHE, APP_CNN)   # another test may have made them
    monkeypatch.setattr(state.BACKGROUND, "jobs", {APP_CNN: Job(APP_CNN, RUNNING)})
    problems = []
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, url, problems)
        assert page.locator("#bias-fit input").is_checked()
        page.locator("#model input").click()
        page.get_by_role("option", name=APP_CNN).click()
        page.wait_for_function("document.querySelector('#fit-note').innerText.includes('being distilled')",
                               timeout=60_000)
        assert not page.locator("#bias-fit input").is_checked()
        cache_fit_images(state.CACHE.load(APP_CNN))
        state.BACKGROUND.jobs[APP_CNN].state = READY
        page.wait_for_function("document.querySelector('#fit-note').innerText.includes('are ready')",
                               timeout=30_000)   # the note's timer asks every 5 s
        page.locator("#model input").click()
        page.get_by_role("option", name=DEFAULT_MODEL).click()
        page.wait_for_function("document.querySelector('#fit-note').innerText.trim() === ''", timeout=60_000)
        browser.close()
    assert not problems, "\n".join(problems)


def _trace_names(page, elem_id: str) -> list:
    return page.eval_on_selector(f"#{elem_id} .js-plotly-plot", "el => (el._fullData || []).map(t => t.name)")


# Each drawn plotly figure's title lines that reach past its own box: cut off at the page's edge
# or under the neighbouring figure.
TITLES_OUTSIDE = """() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent).flatMap(p => {
    const box = p.getBoundingClientRect();
    return [...p.querySelectorAll('.gtitle, .g-gtitle text')].filter(t => {
        const r = t.getBoundingClientRect();
        return r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1);
    }).map(t => t.textContent);
})"""


def test_every_figure_title_fits_a_1280_px_page(app):
    """At 1280x720 the figures' titles are whole: the Law tab's two figures share the width, and
    the predictions figure carries no title of its own under the plot's label."""
    _, url = app
    problems = []
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, url, problems)
        page.set_viewport_size({"width": 1280, "height": 720})
        page.wait_for_function(PREDICTED, timeout=90_000)
        for tab, plots in (("Story", ["story-plot"]), ("Channel ranges", ["ranges-plot"]),
                           ("Law vs reality", ["law-plot", "spread-plot"]),
                           ("Layer error", ["sqnr-plot", "breakdown-plot", "fold-plot"])):
            page.get_by_role("tab", name=tab).click()
            for plot in plots:
                assert _plot_traces(page, plot) > 0, (tab, plot)
            page.wait_for_timeout(500)   # plotly's relayout to the tab's width
            assert page.evaluate(TITLES_OUTSIDE) == [], tab
        browser.close()
    assert not problems, "\n".join(problems)


def test_law_and_advisor_views(app):
    """Law vs reality draws its two figures for the default layer and any channel; the Advisor
    measures, follows the budget, fills the per-layer table with its widths and applies them, and
    the Layer error view then marks the layers it raises."""
    from spiq.config import QuantConfig
    from spiq.ui import advisor

    module, url = app
    problems = []
    with sync_api.sync_playwright() as p:
        browser, page = _open_app(p, url, problems)
        page.wait_for_function(PREDICTED, timeout=90_000)

        page.get_by_role("tab", name="Law vs reality").click()
        page.wait_for_function("document.querySelector('#law-text').innerText.includes('Channel')", timeout=300_000)
        assert _plot_traces(page, "law-plot") > 0 and _plot_traces(page, "spread-plot") > 0
        assert "the law SPIQ predicted (expected counts)" in _trace_names(page, "law-plot")
        channel = page.locator("#law-channel input")
        channel.fill("3")
        channel.press("Enter")
        page.wait_for_function("document.querySelector('#law-text').innerText.includes('Channel 3 of')",
                               timeout=120_000)
        page.wait_for_function("(document.querySelector('#law-plot .gtitle') || {textContent: ''}).textContent"
                               ".includes('input channel 3 ')", timeout=60_000)

        start = time.perf_counter()
        page.get_by_role("tab", name="Advisor").click()
        page.wait_for_function("document.querySelector('#advice-text').innerText.includes('Budget 4.5 bits')",
                               timeout=900_000)
        print(f"Advisor tab, first computation: {time.perf_counter() - start:.1f} s")
        assert _plot_traces(page, "advice-plot") > 0
        budget = page.locator("#budget input[type=number]")
        budget.fill("5")
        budget.press("Tab")   # the number box's blur is the slider's release
        start = time.perf_counter()
        page.wait_for_function("document.querySelector('#advice-text').innerText.includes('Budget 5 bits')",
                               timeout=60_000)
        print(f"Advisor at another budget: {time.perf_counter() - start:.1f} s")

        page.click("#fill-advice")
        page.wait_for_function("document.querySelector('#status').innerText.includes('overrides')", timeout=300_000)
        status = page.inner_text("#status")
        applied = QuantConfig.from_json(status[status.index("{"):status.rindex("}") + 1])   # "Applied {recipe}"
        found, table = state.CACHE.cached_slow(advisor.table_key(DEFAULT_MODEL, QuantConfig()))
        assert found
        expected = advisor.advice_for(table, QuantConfig(), 5.0).config
        assert applied.to_dict() == expected.to_dict()
        assert page.input_value("#abits input[type=number]") == str(expected.input_bits)
        # the per-layer table holds the advised widths
        page.get_by_text("Per-layer settings (edit, then Apply)").click()
        page.wait_for_function("document.querySelectorAll('#layer-table [role=gridcell]').length > 8", timeout=30_000)
        cells = page.eval_on_selector_all("#layer-table [role=gridcell]",
                                          "cs => cs.map(c => [+c.dataset.row, +c.dataset.col, c.innerText.trim()])")
        grid = {}
        for r, c, text in cells:
            grid.setdefault(r, {})[c] = text
        shown = {row[0]: row[5] for row in grid.values() if 0 in row and 5 in row}   # layer: input bits
        assert shown and all(int(float(b)) == expected.for_layer(n).input_bits for n, b in shown.items()), shown
        assert len(set(shown.values())) > 1, shown

        page.get_by_role("tab", name="Layer error").click()
        page.wait_for_function("(el => el && (el._fullData || []).some(t => (t.name || '').startsWith('advisor raises')))"
                               "(document.querySelector('#sqnr-plot .js-plotly-plot'))", timeout=300_000)
        browser.close()
    assert not problems, "\n".join(problems)
