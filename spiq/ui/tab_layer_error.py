"""The Layer error tab: every layer's output SQNR, isolated and propagated; its split into clipping,
input rounding and weights; the fold cost of SPIQ layers; and, once the Advisor has measured the
model and recipe, the layers its advice raises at the session's budget (the Advisor tab's option)."""
from __future__ import annotations

import gradio as gr

from spiq.ui import advisor, views
from spiq.ui.panel import Page
from spiq.ui.viewtabs import Request, TabWork, ViewTab


def _budget(req: Request) -> float:
    return req.option("budget", advisor.DEFAULT_BUDGET)


def layer_error(cache, req: Request, progress=None):
    """(SQNR figure, error sources figure, fold cost figure, table rows)."""
    raised = advisor.layers_raised(cache, req.model, req.config, _budget(req))
    return views.layer_error(cache, views.scene(cache, req.model, req.config, req.image), raised, _budget(req))


def marks(cache, req: Request) -> tuple:
    """The budget whose raised layers it marks, once the advisor has measured this model and recipe."""
    return (_budget(req),) if advisor.has_table(cache, req.model, req.config) else ()


WORK = TabWork("layer-error", layer_error, marks=marks)


def build(page: Page) -> None:
    with page.tab("Layer error", WORK.id) as tab:
        shown = (gr.Plot(label="SQNR per layer", elem_id="sqnr-plot"),
                 gr.Plot(label="Error sources", elem_id="breakdown-plot"),
                 gr.Plot(label="Fold cost (SPIQ layers)", elem_id="fold-plot"),
                 gr.Dataframe(headers=views.LAYER_ERROR_HEADERS, type="array", interactive=False))
    page.add_view(tab, ViewTab(WORK, shown, lambda result: dict(zip(shown, result, strict=True)),
                               refresh="layer error"))
