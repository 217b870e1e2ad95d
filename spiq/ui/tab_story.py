"""The Story tab: float vs SPIQ vs per-tensor static at the applied bits, on one screen (for
presentations): logit error maps and top-5."""
from __future__ import annotations

import gradio as gr

from spiq.ui import views
from spiq.ui.panel import Page
from spiq.ui.viewtabs import Request, TabWork, ViewTab


def story(cache, req: Request, progress=None):
    return views.story(cache, req.model, req.config, req.image)


WORK = TabWork("story", story)


def build(page: Page) -> None:
    with page.tab("Story", WORK.id) as tab:
        gr.Markdown("Float vs SPIQ vs per-tensor static at the applied bits, on one screen.")
        plot = gr.Plot(label="Story", elem_id="story-plot")
    page.add_view(tab, ViewTab(WORK, (plot,), lambda fig: {plot: fig}, refresh="story"))
