"""The Channel ranges tab: for a layer, each input channel's data-free range, what the image used,
the one per-tensor range, and the bits used per channel against per tensor."""
from __future__ import annotations

import gradio as gr

from spiq.ui import state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, layer_name, need_image, recipe, user_errors
from spiq.ui.viewtabs import Request, TabWork, ViewTab


def ranges(cache, req: Request, progress=None):
    """(layers the dropdown offers, the layer shown, its figure): the session's layer, or the one
    whose channels' data-free ranges differ most."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = sc.range_layers
    layer = req.option("range_layer")
    layer = layer if layer in layers else views.default_range_layer(cache, sc)
    return layers, layer, views.channel_ranges(cache, sc, layer) if layer else None


WORK = TabWork("ranges", ranges, options=("range_layer",))


@user_errors
@admitted()
def show_ranges(model_name, applied, image, layer):
    """One layer's channel ranges; without a layer (an API client's first call), the tab's own."""
    sc = views.scene(state.CACHE, model_name, recipe(applied), need_image(image))
    layer = layer_name(layer) or views.default_range_layer(state.CACHE, sc)
    if layer is None:
        raise gr.Error("No layer of this model has a data-free range to show.")
    return views.channel_ranges(state.CACHE, sc, layer)


def build(page: Page) -> None:
    with page.tab("Channel ranges", WORK.id) as tab:
        layer = gr.Dropdown([], label="Layer", elem_id="range-layer", allow_custom_value=True)
        plot = gr.Plot(label="Channel ranges", elem_id="ranges-plot")
    page.add_view(tab, ViewTab(WORK, (layer, plot),
                               lambda result: {layer: gr.update(choices=result[0], value=result[1]), plot: result[2]},
                               controls={"range_layer": (layer, None)}, refresh="channel ranges"))
    layer.input(show_ranges, [page.applied_model, page.applied, page.image, layer], plot, api_name="ranges",
                **group("views"))
