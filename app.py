"""SPIQ Explorer, the Gradio app: layout and wiring only. The handlers are `spiq.ui.handlers`;
every number and figure comes from `spiq.ui.views`.

Run `python app.py` (offline, with the embedded EfficientNet-Lite0); the same file is the entry
point of the Hugging Face Space.
"""
from __future__ import annotations

import functools
import json
import os
import threading

import gradio as gr

from spiq import METHODS, QuantConfig
from spiq.ui import advisor, views
from spiq.ui.components import BitsSlider, BudgetSlider, SafeDataframe, SafeFile, SafeImage
from spiq.ui.handlers import (ATTRIBUTIONS, CACHE, DELETE_CACHE, NO_ATTENTION, NO_IMAGE, TAB_OUTPUTS,
                              VIEW_OUTPUTS, apply, compute_tab, fit_status, fill_advice, load_recipe,
                              model_choices, open_link, open_tab, predict, predict_linked, refresh,
                              select_model, show_advisor, show_attention, show_attribution, show_deploy, show_error_map,
                              show_law, show_methods, show_ranges, unavailable_note, warm_up, recipe_file)
from spiq.ui.page import DEFAULT_MODEL, EXAMPLES, first_predictions, link_query
from spiq.ui.server import launch_options
from spiq.ui.tabs import TABS

# --- layout -------------------------------------------------------------------------------------

TITLE = ("## SPIQ Explorer · data-free post-training quantization, live\n"
         "Pick a recipe, press **Apply**, and compare the float and the quantized model on an image.")
ABOUT = """**SPIQ** (Yvinec et al., WACV 2023) quantizes each conv/linear input *per input channel* with ranges
derived from BatchNorm statistics (no data) and folds the per-channel scales into the weights. Compare it with
per-tensor, calibrated and dynamic ranges, and see *why* a setting works in the tabs below: channel ranges,
per-layer error, error maps, attribution drift.

Methods: `spiq` is data-free per-channel static; `calib-*` and `liu-ptq` (transformers only) calibrate on the
example images; `dynamic-*` compute ranges on each input. Models that cannot load here:"""


# Event groups of the queue (concurrency_id: limit). Predictions, and views answered from the
# cache, never wait in a group behind the expensive work: quantizing, computing a view (Integrated
# Gradients, Methods: seconds), exporting.
GROUPS = {"predict": 4, "cheap": 8, "apply": 2, "views": 2, "deploy": 1}


def group(name: str) -> dict:
    return {"concurrency_id": name, "concurrency_limit": GROUPS[name]}


# long: one page, laid out top to bottom as it appears, then its events
def build() -> gr.Blocks:
    default = QuantConfig()
    loaded = CACHE.load(DEFAULT_MODEL)
    first_plot, first_text = first_predictions(CACHE)   # in the page itself: no request before the first result
    with gr.Blocks(title="SPIQ Explorer", delete_cache=DELETE_CACHE) as demo:
        applied = gr.State(default.to_json())          # this user's recipe, as last applied
        applied_model = gr.State(DEFAULT_MODEL)
        # At 1280x720 the recipe, the image and the predictions fit on one screen, side by side; the
        # explanation and the analysis tabs follow below.
        gr.Markdown(TITLE)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                with gr.Row():
                    model = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, label="Model", elem_id="model",
                                        min_width=150)
                    method = gr.Dropdown(list(METHODS), value=default.method, label="Method", elem_id="method",
                                         min_width=150)
                with gr.Row():
                    wbits = BitsSlider(2, 16, value=default.weight_bits, step=1, label="Weight bits", elem_id="wbits")
                    abits = BitsSlider(2, 16, value=default.input_bits, step=1, label="Input bits", elem_id="abits")
                with gr.Row():
                    wgran = gr.Dropdown(["channel", "tensor"], value="channel", label="Weight granularity",
                                        min_width=150)
                    igran = gr.Dropdown(["method default", "channel", "tensor"], value="method default",
                                        label="Input granularity", min_width=150)
                bias_fit = gr.Checkbox(value=True, label="Bias fit on distilled images", elem_id="bias-fit",
                                       info="bias correction on images distilled from BatchNorm statistics "
                                            "(data-free; other models' images are distilled after start)")
                fit_note = gr.Markdown(elem_id="fit-note")
                fit_timer = gr.Timer(5, active=False)   # asks whether the background fit is ready
                apply_btn = gr.Button("Apply", variant="primary", elem_id="apply")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3, min_width=300):
                image = SafeImage(value=EXAMPLES[0] if EXAMPLES else None, type="pil", image_mode=None,
                                  sources=["upload", "webcam", "clipboard"], label="Image", height=260,
                                  elem_id="image")
                examples = gr.Examples(EXAMPLES, inputs=image,
                                       label="Examples (freely licensed, see assets/LICENSES.md)")
            with gr.Column(scale=4, min_width=360):
                pred_text = gr.Markdown(first_text, elem_id="pred-text")
                pred_plot = gr.Plot(first_plot, format="png", label="Top-5, float vs quantized", elem_id="pred-plot")
        with gr.Accordion("What SPIQ does, the methods, and the models not available here", open=False):
            gr.Markdown(ABOUT)
            gr.Markdown(unavailable_note())
        with gr.Accordion("Per-layer settings (edit, then Apply)", open=False):
            table = SafeDataframe(views.layer_rows(loaded.model, default), headers=views.LAYER_TABLE_HEADERS,
                                 datatype=["str", "str", "number", "str", "number", "number", "str", "bool"],
                                 type="array", interactive=True, static_columns=[0, 1, 2], elem_id="layer-table")
        views_note = gr.Markdown(elem_id="views-note")
        # Each tab is computed when it comes into view: `shown` is the tab in view, `drawn` what each
        # tab shows, and a new `job` value asks for a tab that is not in the cache.
        shown, drawn, job = gr.State(TABS[0]), gr.State({}), gr.State(None)
        with gr.Tabs():
            with gr.Tab("Story", id="story") as story_tab:
                gr.Markdown("Float vs SPIQ vs per-tensor static at the applied bits, on one screen.")
                story_plot = gr.Plot(label="Story", elem_id="story-plot")
            with gr.Tab("Channel ranges", id="ranges") as ranges_tab:
                range_layer = gr.Dropdown([], label="Layer", elem_id="range-layer", allow_custom_value=True)
                ranges_plot = gr.Plot(label="Channel ranges", elem_id="ranges-plot")
            with gr.Tab("Law vs reality", id="law") as law_tab:
                gr.Markdown("The law SPIQ predicted for one input channel from BatchNorm statistics (the one its "
                            "ranges were chosen from) against the values the channel takes on this image.")
                with gr.Row():
                    law_layer = gr.Dropdown([], label="Layer", elem_id="law-layer", allow_custom_value=True)
                    law_channel = gr.Number(None, precision=0, label="Input channel (Enter to show)",
                                            elem_id="law-channel")
                law_text = gr.Markdown(elem_id="law-text")
                with gr.Row():
                    law_plot = gr.Plot(label="Values vs law", elem_id="law-plot")
                    spread_plot = gr.Plot(label="Predicted vs observed spread", elem_id="spread-plot")
            with gr.Tab("Layer error", id="layer-error") as error_tab:
                sqnr_plot = gr.Plot(label="SQNR per layer", elem_id="sqnr-plot")
                breakdown_plot = gr.Plot(label="Error sources", elem_id="breakdown-plot")
                fold_plot = gr.Plot(label="Fold cost (SPIQ layers)", elem_id="fold-plot")
                error_table = gr.Dataframe(headers=views.LAYER_ERROR_HEADERS, type="array", interactive=False)
            with gr.Tab("Error map", id="error-map") as map_tab:
                with gr.Row():
                    map_layer = gr.Dropdown(["logits"], value="logits", label="Layer", elem_id="map-layer",
                                            allow_custom_value=True)
                    channel = gr.Number(None, precision=0, label="Channel (empty: mean over channels)")
                emap_plot = gr.Plot(label="Error map", elem_id="emap-plot")
            with gr.Tab("Attribution", id="attribution") as attr_tab:
                attr_method = gr.Radio(ATTRIBUTIONS, value="grad-cam", label="Attribution (captum)")
                attr_plot = gr.Plot(label="Attribution drift", elem_id="attr-plot")
            with gr.Tab("Attention", id="attention") as attention_tab:
                block = gr.Slider(0, 11, value=11, step=1, label="Block", visible=False, elem_id="block")
                attention_text = gr.Markdown(NO_ATTENTION, elem_id="attention-text")
                attention_plot = gr.Plot(label="Attention maps per head", elem_id="attention-plot")
                inversions_plot = gr.Plot(label="Rank inversions per block", elem_id="inversions-plot")
            with gr.Tab("Methods", id="methods") as methods_tab:
                methods_plot = gr.Plot(label="All methods on this image", elem_id="methods-plot")
                methods_table = gr.Dataframe(headers=views.METHODS_HEADERS, type="array", interactive=False)
            with gr.Tab("Advisor", id="advisor") as advisor_tab:
                gr.Markdown("Per-layer input widths under an average-bits budget, from the data-free sensitivity of "
                            "each layer measured on images distilled from BatchNorm statistics (the first time for a "
                            "model and recipe: tens of seconds).")
                with gr.Row():
                    budget = BudgetSlider(4.0, 8.0, value=advisor.DEFAULT_BUDGET, step=0.25, elem_id="budget",
                                       label="Budget: average input bits, weighted by input values per image")
                    fill_btn = gr.Button("Fill table and apply", variant="primary", elem_id="fill-advice")
                advice_text = gr.Markdown(elem_id="advice-text")
                advice_plot = gr.Plot(label="Sensitivity ranking", elem_id="advice-plot")
                advice_table = gr.Dataframe(headers=advisor.ADVISOR_HEADERS, type="array", interactive=False,
                                            elem_id="advice-table")
            with gr.Tab("Deploy", id="deploy") as deploy_tab:
                gr.Markdown("Export the applied recipe as an ONNX int8 model (per-tensor activation quantizers: "
                            "SPIQ's per-channel grids are folded into the weights), run it with ONNX Runtime on this "
                            "image and time it against FP32, ONNX Runtime's static int8 (calibrated on the example "
                            "images) and dynamic int8. Needs 8-bit inputs and a static method.")
                deploy_btn = gr.Button("Export and run int8", elem_id="deploy")
                deploy_text = gr.Markdown(elem_id="deploy-text")
                with gr.Row():
                    latency_plot = gr.Plot(label="Latency", elem_id="latency-plot")
                    parity_plot = gr.Plot(label="Real int8 vs simulation", elem_id="parity-plot")
                onnx_file = gr.File(label="The exported .onnx", interactive=False)
            with gr.Tab("Recipe", id="recipe") as recipe_tab:
                recipe = gr.Code(default.to_json(indent=2), language="json", label="Applied recipe", interactive=False)
                with gr.Row():
                    download = gr.DownloadButton("Download recipe JSON", value=recipe_file(default),
                                                 elem_id="download-recipe")
                    upload = SafeFile(file_types=[".json"], type="filepath", label="Upload a recipe JSON")
                link = gr.Textbox(label="Link to this recipe and, for a shipped example, this image",
                                  buttons=["copy"], interactive=False, elem_id="share-link")
        # API endpoints only: every view at once (`refresh`), the Methods tab (`methods`).
        api_only = gr.Button(visible=False)

        views_out = [story_plot, range_layer, ranges_plot, sqnr_plot, breakdown_plot, fold_plot, error_table,
                     map_layer, emap_plot, attr_plot, block, attention_plot, inversions_plot, attention_text, views_note]
        assert len(views_out) == VIEW_OUTPUTS
        tab_out = [*views_out, methods_plot, methods_table, advice_text, advice_plot, advice_table,
                   law_layer, law_channel, law_plot, spread_plot, law_text]
        assert len(tab_out) == TAB_OUTPUTS
        view_in = [applied_model, applied, image, range_layer, map_layer, channel, attr_method, block]
        tab_in = [*view_in, budget, law_layer, law_channel]   # `refresh` (an API) keeps view_in

        def then_views(event):
            """After new predictions (model, recipe or image), the tab in view (from the cache or a job)
            and the link to this state, made absolute in the browser, which knows the page's address."""
            event.success(link_query, [applied, image], link, api_name=False, show_progress="hidden", **group("cheap")
                          ).success(None, link, link, js="(q) => location.origin + location.pathname + q")
            return event.success(open_tab, [shown, drawn, *tab_in], [shown, drawn, job, *tab_out], api_name=False,
                                 show_progress="hidden", **group("cheap"))

        view_tabs = [(story_tab, "story"), (ranges_tab, "ranges"), (law_tab, "law"), (error_tab, "layer-error"),
                     (map_tab, "error-map"), (attr_tab, "attribution"), (attention_tab, "attention"),
                     (methods_tab, "methods"), (advisor_tab, "advisor")]
        assert tuple(t for _, t in view_tabs) == TABS
        for tab, tab_id in view_tabs:
            tab.select(functools.partial(open_tab, tab_id), [drawn, *tab_in], [shown, drawn, job, *tab_out],
                       api_name=False, show_progress="hidden", **group("cheap"))
        for tab in (deploy_tab, recipe_tab):   # no view to compute: nothing follows their being shown
            tab.select(lambda: None, None, shown, api_name=False, **group("cheap"))
        job.change(compute_tab, [job, drawn, *tab_in], [drawn, *tab_out], api_name=False, **group("views"))

        controls = [method, wbits, abits, wgran, igran, bias_fit]
        predict_io = dict(fn=predict, inputs=[applied_model, applied, image], outputs=[pred_plot, pred_text])
        then_views(model.change(select_model, [model, applied_model, *controls],
                                [applied_model, model, table, applied, status, method, bias_fit, fit_note, fit_timer],
                                api_name="select_model",
                                **group("apply")
                                ).success(**predict_io, api_name=False, **group("predict")))
        then_views(apply_btn.click(apply, [applied_model, applied, *controls, table, image],
                                   [applied, table, recipe, download, status, pred_plot, pred_text], api_name="apply",
                                   **group("apply")))
        # Not image.change: Gradio's image empties itself when a new file starts uploading over a shown
        # one, so .change fires twice and both requests carry the new file (a bad file: its error twice).
        # .upload is once per file, pasted and webcam ones too; examples and Remove are wired apart.
        then_views(image.upload(**predict_io, api_name="predict", trigger_mode="always_last", **group("predict")))
        then_views(examples.load_input_event.success(**predict_io, api_name=False, trigger_mode="always_last",
                                                     **group("predict")))
        fit_timer.tick(fit_status, applied_model, [fit_note, fit_timer], api_name=False, show_progress="hidden",
                       **group("cheap"))
        image.clear(None, None, [pred_plot, pred_text], js=f"() => [null, {json.dumps(NO_IMAGE)}]", api_name=False)
        range_layer.input(show_ranges, [applied_model, applied, image, range_layer], ranges_plot, api_name="ranges",
                          **group("views"))
        law_layer.input(show_law, [applied_model, applied, image, law_layer, gr.State(None)],
                        [law_channel, law_plot, spread_plot, law_text], api_name="law", **group("views"))
        law_channel.submit(show_law, [applied_model, applied, image, law_layer, law_channel],
                           [law_channel, law_plot, spread_plot, law_text], api_name=False, **group("views"))
        budget.release(show_advisor, [applied_model, applied, budget], [advice_text, advice_plot, advice_table],
                       api_name="advisor", **group("views"))
        # The advice becomes the controls and the table, then is applied like a click on Apply.
        then_views(fill_btn.click(fill_advice, [applied_model, applied, budget], [*controls, table, applied],
                                  api_name="fill_advice", **group("views")
                                  ).success(apply, [applied_model, applied, *controls, table, image],
                                            [applied, table, recipe, download, status, pred_plot, pred_text],
                                            api_name=False, **group("apply")))
        map_layer.input(show_error_map, [applied_model, applied, image, map_layer, channel], emap_plot,
                        api_name="error_map", **group("views"))
        channel.submit(show_error_map, [applied_model, applied, image, map_layer, channel], emap_plot, api_name=False,
                       **group("views"))
        attr_method.input(show_attribution, [applied_model, applied, image, attr_method], attr_plot,
                          api_name="attribution", **group("views"))
        block.release(show_attention, [applied_model, applied, image, block],
                      [attention_plot, inversions_plot, attention_text], api_name="attention", **group("views"))
        deploy_btn.click(show_deploy, [applied_model, applied, image], [latency_plot, parity_plot, deploy_text, onnx_file],
                         api_name="deploy", **group("deploy"))
        # An uploaded recipe replaces the controls and the table, then is applied like a click on Apply.
        then_views(upload.upload(load_recipe, [upload, applied_model], [*controls, table, applied],
                                 api_name="load_recipe", **group("cheap")
                                 ).success(apply, [applied_model, applied, *controls, table, image],
                                           [applied, table, recipe, download, status, pred_plot, pred_text],
                                           api_name=False, **group("apply")))
        # A link restores its recipe and example, then predicts; a default page has its predictions already.
        linked = gr.State(False)
        then_views(demo.load(open_link, applied_model, [*controls, table, applied, image, status, recipe, download,
                                                   pred_plot, pred_text, linked],
                             api_name=False, show_progress="hidden", **group("cheap")
                             # a link's recipe is quantized first: work like Apply's, not a prediction's
                             ).success(predict_linked, [linked, applied_model, applied, image], [pred_plot, pred_text],
                                       api_name=False, show_progress="hidden", **group("apply")))
        api_only.click(refresh, view_in, views_out, api_name="refresh", **group("views"))
        api_only.click(show_methods, [applied_model, applied, image], [methods_plot, methods_table],
                       api_name="methods", **group("views"))
    return demo


demo = build()

if __name__ == "__main__":
    from spiq.ui import lifecycle

    lifecycle.install()   # SIGTERM, Ctrl-C: children stopped, scratch deleted, a prompt exit
    threading.Thread(target=warm_up, daemon=True).start()
    demo.queue(default_concurrency_limit=4).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                                                   **launch_options())
