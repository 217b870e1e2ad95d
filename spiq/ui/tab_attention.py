"""The Attention tab, for vision transformers: per head, where the class token looks in a chosen
block, float against quantized, and per block the share of attention-score pairs whose order the
quantized model reverses."""
from __future__ import annotations

import functools

import gradio as gr

from spiq.ui import state, views
from spiq.ui.panel import Page
from spiq.ui.request import admitted, group, need_image, recipe, user_errors, whole
from spiq.ui.viewtabs import Request, TabWork, ViewTab

NO_ATTENTION = "Attention maps are for vision transformers; pick a DeiT or ViT model to see them."


def attention(cache, req: Request, progress=None):
    """None for a model without attention, else (last block, the block shown, maps, inversions, text)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    if not views.is_transformer(sc.qmodel.model):
        return None
    last = len(sc.qmodel.model.blocks) - 1
    block = min(int(req.option("block")), last) if req.option("block") is not None else last
    return (last, block, *views.attention(cache, sc, block))


WORK = TabWork("attention", attention, options=("block",))


def build(page: Page) -> None:
    with page.tab("Attention", WORK.id) as tab:
        block = gr.Slider(0, 11, value=11, step=1, label="Block", visible=False, elem_id="block")
        text = gr.Markdown(NO_ATTENTION, elem_id="attention-text")
        maps = gr.Plot(label="Attention maps per head", elem_id="attention-plot")
        inversions = gr.Plot(label="Rank inversions per block", elem_id="inversions-plot")
    shown = (maps, inversions, text)   # views.attention's (maps, inversions, text)

    def show(result) -> dict:
        if result is None:
            return {block: gr.update(visible=False), maps: None, inversions: None, text: NO_ATTENTION}
        return {block: gr.update(visible=True, maximum=result[0], value=result[1]),
                **dict(zip(shown, result[2:], strict=True))}

    @user_errors
    @admitted()
    def show_attention(model_name, applied, image, block) -> dict:
        sc = views.scene(state.CACHE, model_name, recipe(applied), need_image(image))
        if not views.is_transformer(sc.qmodel.model):
            raise gr.Error(NO_ATTENTION)
        return dict(zip(shown, views.attention(state.CACHE, sc, whole("block", block)), strict=True))

    page.add_view(tab, ViewTab(WORK, (block, *shown), show, controls={"block": (block, functools.partial(whole,
                                                                                                          "block"))},
                               refresh="attention"))
    block.release(show_attention, [page.applied_model, page.applied, page.image, block], list(shown),
                  api_name="attention", **group("views"))
