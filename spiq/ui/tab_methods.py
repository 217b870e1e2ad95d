"""The Methods tab: every method at the applied bits on this image: top-1, agreement with the float
model, logit SQNR (`calib-*` calibrate on the example images)."""
from __future__ import annotations

import gradio as gr

from spiq.ui import state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, progress_bar, recipe, user_errors
from spiq.ui.viewtabs import Request, TabWork, ViewTab, compute


def methods(cache, req: Request, progress=None):
    """(figure, table rows) of every method at the applied bits."""
    fig, rows = views.methods(cache, req.model, req.config, req.image, progress)
    return fig, views.methods_table(rows)


WORK = TabWork("methods", methods)


def build(page: Page) -> None:
    with page.tab("Methods", WORK.id) as tab:
        shown = (gr.Plot(label="All methods on this image", elem_id="methods-plot"),
                 gr.Dataframe(headers=views.METHODS_HEADERS, type="array", interactive=False))
        api_only = gr.Button(visible=False)

    def show(result) -> dict:
        return dict(zip(shown, result, strict=True))

    @user_errors
    @admitted()
    def show_methods(model_name, applied, image, progress=gr.Progress()) -> dict:
        """The tab as an API endpoint: after new bits every method quantizes anew (each with its
        own bias fit), over a second of work. Shares the tab's cached result."""
        if image is None:
            return gr.skip()
        req = Request(model_name, recipe(applied), image, views.image_digest(image))
        return show(compute(state.CACHE, req, WORK, progress_bar(progress)))

    page.add_view(tab, ViewTab(WORK, shown, show))
    api_only.click(show_methods, [page.applied_model, page.applied, page.image], list(shown), api_name="methods",
                   **group("views"))
