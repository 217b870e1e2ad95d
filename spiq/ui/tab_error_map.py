"""The Error map tab: |y - ŷ| of a layer over the image (mean over channels, or one channel), or of
the top-1 logit; for a transformer, a token layer's patch tokens on their grid."""
from __future__ import annotations

import functools

import gradio as gr

from spiq.ui import state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, need_image, recipe, user_errors, whole
from spiq.ui.viewtabs import Request, TabWork, ViewTab


def error_map(cache, req: Request, progress=None):
    """(layers the dropdown offers, the layer shown, its figure)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = ["logits", *sc.map_layers]
    layer = req.option("map_layer") if req.option("map_layer") in layers else "logits"
    return layers, layer, views.error_map(cache, sc, layer, req.option("channel") if layer != "logits" else None)


WORK = TabWork("error-map", error_map, options=("map_layer", "channel"))


@user_errors
@admitted()
def show_error_map(model_name, applied, image, layer, channel):
    sc = views.scene(state.CACHE, model_name, recipe(applied), need_image(image))
    return views.error_map(state.CACHE, sc, layer, whole("channel", channel) if layer != "logits" else None)


def build(page: Page) -> None:
    with page.tab("Error map", WORK.id) as tab:
        with gr.Row():
            layer = gr.Dropdown(["logits"], value="logits", label="Layer", elem_id="map-layer", allow_custom_value=True)
            channel = gr.Number(None, precision=0, label="Channel (empty: mean over channels)")
        plot = gr.Plot(label="Error map", elem_id="emap-plot")
    page.add_view(tab, ViewTab(WORK, (layer, plot),
                               lambda result: {layer: gr.update(choices=result[0], value=result[1]), plot: result[2]},
                               controls={"map_layer": (layer, None), "channel": (channel, functools.partial(whole,
                                                                                                           "channel"))},
                               refresh="error map"))
    inputs = [page.applied_model, page.applied, page.image, layer, channel]
    layer.input(show_error_map, inputs, plot, api_name="error_map", **group("views"))
    channel.submit(show_error_map, inputs, plot, api_name=False, **group("views"))
