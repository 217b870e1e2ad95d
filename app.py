"""SPIQ Explorer, the Gradio app: the page composed of its parts, then served.

Each part lays out its components and registers its events in a module of its own: the panel at the
top, with the recipe, the image and the predictions (`spiq.ui.panel`, which makes the `Page` every
tab builds on), then one module per tab (`spiq.ui.tab_<name>`, named in TABS). A new tab is a new
module with a `build(page)` and its name in TABS (docs/app.md, "Adding a tab").

Run `python app.py` (offline, with the embedded EfficientNet-Lite0); the same file is the entry
point of the Hugging Face Space.
"""
from __future__ import annotations

import importlib
import os
import threading

import gradio as gr

from spiq.ui import panel, state, viewtabs
from spiq.ui.panel import Page
from spiq.ui.server import launch_options

# The tabs, in the order they appear: each the module spiq.ui.tab_<name>, whose build(page) lays it out.
TABS = ("story", "ranges", "law", "layer_error", "error_map", "attribution", "attention", "methods", "advisor",
        "deploy", "recipe")


def build() -> tuple[gr.Blocks, Page]:
    with gr.Blocks(title="SPIQ Explorer", delete_cache=state.DELETE_CACHE) as demo:
        page = panel.build(demo)   # the recipe, the image and the predictions, on one screen
        with gr.Tabs():
            for name in TABS:
                importlib.import_module(f"spiq.ui.tab_{name}").build(page)
        viewtabs.wire(page)   # each tab showing a view computed when shown, from the cache when it can be
    return demo, page


demo, page = build()

if __name__ == "__main__":
    from spiq.ui import lifecycle

    lifecycle.install()   # SIGTERM, Ctrl-C: children stopped, scratch deleted, a prompt exit
    threading.Thread(target=state.warm_up, daemon=True).start()
    demo.queue(default_concurrency_limit=4).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                                                   **launch_options())
