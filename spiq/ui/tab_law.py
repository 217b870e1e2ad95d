"""The Law vs reality tab: the law SPIQ predicted for one input channel from BatchNorm statistics
against the values the channel takes on the image, and every channel's predicted against observed
spread."""
from __future__ import annotations

import functools

import gradio as gr

from spiq.ui import advisor, state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, layer_name, need_image, recipe, user_errors, whole
from spiq.ui.viewtabs import Request, TabWork, ViewTab

NO_LAW = "No layer of this model has a data-free law to compare with."


def law(cache, req: Request, progress=None):
    """None where no layer has a law, else (layers the dropdown offers, the layer and channel shown,
    the histogram, the spread scatter, the summary)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = advisor.law_layers(sc)
    if not layers:
        return None
    if req.option("law_layer") in layers:
        layer, channel = req.option("law_layer"), req.option("law_channel")
    else:   # another layer's channel means nothing here
        layer, channel = advisor.default_law_layer(cache, sc), None
    return (layers, layer, *advisor.law(cache, sc, layer, channel))


WORK = TabWork("law", law, options=("law_layer", "law_channel"))


def build(page: Page) -> None:
    with page.tab("Law vs reality", WORK.id) as tab:
        gr.Markdown("The law SPIQ predicted for one input channel from BatchNorm statistics (the one its "
                    "ranges were chosen from) against the values the channel takes on this image.")
        with gr.Row():
            layer = gr.Dropdown([], label="Layer", elem_id="law-layer", allow_custom_value=True)
            channel = gr.Number(None, precision=0, label="Input channel (Enter to show)", elem_id="law-channel")
        text = gr.Markdown(elem_id="law-text")
        with gr.Row():
            plot = gr.Plot(label="Values vs law", elem_id="law-plot")
            spread = gr.Plot(label="Predicted vs observed spread", elem_id="spread-plot")
        no_channel = gr.State(None)   # a new layer opens on its default channel
    shown = (channel, plot, spread, text)   # advisor.law's (channel, histogram, scatter, summary)

    def show(result) -> dict:
        if result is None:
            return {layer: gr.update(choices=[], value=None), channel: None, plot: None, spread: None, text: NO_LAW}
        return {layer: gr.update(choices=result[0], value=result[1]), **dict(zip(shown, result[2:], strict=True))}

    @user_errors
    @admitted()
    def show_law(model_name, applied, image, law_layer, law_channel) -> dict:
        """The tab for another layer (its default channel) or channel."""
        sc = views.scene(state.CACHE, model_name, recipe(applied), need_image(image))
        law_layer = layer_name(law_layer) or advisor.default_law_layer(state.CACHE, sc)
        if law_layer is None:
            raise gr.Error(NO_LAW)
        return dict(zip(shown, advisor.law(state.CACHE, sc, law_layer, whole("channel", law_channel)), strict=True))

    page.add_view(tab, ViewTab(WORK, (layer, *shown), show, controls={
        "law_layer": (layer, None), "law_channel": (channel, functools.partial(whole, "channel"))}))
    inputs = [page.applied_model, page.applied, page.image, layer]
    layer.input(show_law, [*inputs, no_channel], list(shown), api_name="law", **group("views"))
    channel.submit(show_law, [*inputs, channel], list(shown), api_name=False, **group("views"))
