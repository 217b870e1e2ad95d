"""How the app's page is composed: one module per tab under spiq/ui/, each named once in app.py's
TABS; a tab plugs in with its build(page) alone, its handlers answering {component: update}."""
import ast
from pathlib import Path

import gradio as gr
from PIL import Image

from spiq.config import QuantConfig
from spiq.ui.page import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]


def _app_tabs() -> tuple:
    tree = ast.parse((ROOT / "app.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TABS")
    return ast.literal_eval(node.value)


def test_every_tab_module_is_named_once_in_the_app():
    modules = sorted(p.stem.removeprefix("tab_") for p in (ROOT / "spiq" / "ui").glob("tab_*.py"))
    tabs = _app_tabs()
    assert sorted(tabs) == modules and len(set(tabs)) == len(tabs)


def test_the_app_lays_out_its_tabs_in_order(app):
    module, _ = app
    ids = [tab.id for tab, _ in module.page.tabs]
    assert ids == ["story", "ranges", "law", "layer-error", "error-map", "attribution", "attention", "methods",
                   "advisor", "deploy", "recipe"]
    assert [tab.id for tab, view in module.page.tabs if view is None] == ["deploy", "recipe"]   # no view


class _Bar:
    def __call__(self, *args, **kwargs):
        pass


def test_a_new_tab_needs_only_its_build(app):
    """A plain tab and a tab showing a view, built on a page of their own: the view is computed by
    the shared events like any other, its option checked by its own check, its result in the cache."""
    from spiq.ui import panel, state, viewtabs

    def bits(cache, req, progress=None):
        return f"W{req.config.weight_bits}A{req.config.input_bits}, option {req.option('times')}"

    work = viewtabs.TabWork("bits", bits, options=("times",))
    seen = {}

    def build_plain(page):
        with page.tab("Plain", "plain"):
            seen["note"] = gr.Markdown()

    def build_view(page):
        with page.tab("Bits", work.id) as tab:
            times = gr.Number(2, precision=0)
            text = gr.Markdown()
        seen["text"] = text
        page.add_view(tab, viewtabs.ViewTab(work, (text,), lambda result: {text: result},
                                            controls={"times": (times, int)}, refresh="bits"))

    with gr.Blocks() as demo:
        page = panel.build(demo)
        with gr.Tabs():
            build_plain(page)
            build_view(page)
        events = viewtabs.wire(page)
    assert [(t.id, v is not None) for t, v in page.tabs] == [("plain", False), ("bits", True)]
    image, applied = Image.new("RGB", (32, 32)), QuantConfig(input_bits=5).to_json()
    opened = events.open_tab("bits", {}, DEFAULT_MODEL, applied, image, times=3.0)
    assert opened[events.shown] == "bits" and opened[events.job]["tab"] == "bits"   # not cached yet: a job
    out = events.compute_tab(opened[events.job], opened[events.drawn], DEFAULT_MODEL, applied, image, progress=_Bar(),
                             times=3.0)
    assert out[seen["text"]] == "W8A5, option 3" and "input_bits" in out[page.views_note]
    again = events.open_tab("bits", {}, DEFAULT_MODEL, applied, image, times=3.0)   # from the cache now
    assert again[seen["text"]] == "W8A5, option 3" and events.job not in again
    assert set(events.refresh(DEFAULT_MODEL, applied, image, progress=_Bar(), times=1)) == {seen["text"],
                                                                                          page.views_note}
    assert state.CACHE.cached_view(work.key(state.CACHE, events.request(DEFAULT_MODEL, applied, image,
                                                                        {"times": 3})))[0]


def test_a_component_between_the_tabs_is_refused():
    """Made after its tab's block, a component sits between the tabs, and Gradio's front end then
    shows one tab's button in another's place: the page refuses it by name."""
    from types import SimpleNamespace

    import pytest

    from spiq.ui import viewtabs

    with gr.Blocks():
        with gr.Tabs():
            with gr.Tab("One", id="one") as one:
                gr.Markdown()
            gr.State(None)   # outside any tab
            with gr.Tab("Two", id="two") as two:
                gr.Markdown()
        with pytest.raises(ValueError, match="State laid out between the tabs"):
            viewtabs.ViewEvents(SimpleNamespace(tabs=[(one, None), (two, None)]))
