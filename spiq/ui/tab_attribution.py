"""The Attribution tab: Grad-CAM (default) or Integrated Gradients (captum) on the float and the
quantized model, their difference and rank correlation."""
from __future__ import annotations

import gradio as gr

from spiq.ui import state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, need_image, recipe, user_errors
from spiq.ui.viewtabs import Request, TabWork, ViewTab

ATTRIBUTIONS = ["grad-cam", "integrated-gradients"]


def attribution(cache, req: Request, progress=None):
    sc = views.scene(cache, req.model, req.config, req.image)
    return views.attribution(cache, sc, req.option("attr_method"))


WORK = TabWork("attribution", attribution, options=("attr_method",))


def _method(value) -> str:
    """The method as sent; none is Grad-CAM (views.attribution refuses an unknown one by name)."""
    return value or ATTRIBUTIONS[0]


@user_errors
@admitted()
def show_attribution(model_name, applied, image, method, progress=gr.Progress()):
    progress(0.1, desc=f"{method} on both models")
    sc = views.scene(state.CACHE, model_name, recipe(applied), need_image(image))
    return views.attribution(state.CACHE, sc, method)


def build(page: Page) -> None:
    with page.tab("Attribution", WORK.id) as tab:
        method = gr.Radio(ATTRIBUTIONS, value=ATTRIBUTIONS[0], label="Attribution (captum)")
        plot = gr.Plot(label="Attribution drift", elem_id="attr-plot")
    page.add_view(tab, ViewTab(WORK, (plot,), lambda fig: {plot: fig}, controls={"attr_method": (method, _method)},
                               refresh="attribution"))
    method.input(show_attribution, [page.applied_model, page.applied, page.image, method], plot,
                 api_name="attribution", **group("views"))
