"""SPIQ Explorer, the Gradio app: layout and wiring only. The handlers are `spiq.ui.handlers`;
every number and figure comes from `spiq.ui.views`.

Run `python app.py` (offline, with the embedded EfficientNet-Lite0); the same file is the entry
point of the Hugging Face Space.
"""
from __future__ import annotations

import json
import os
import threading

import gradio as gr

from spiq import METHODS, QuantConfig
from spiq.ui import views
from spiq.ui.handlers import (ATTRIBUTIONS, CACHE, DEFAULT_MODEL, DELETE_CACHE, EXAMPLES, MAX_UPLOAD_BYTES, NO_ATTENTION,
                              NO_IMAGE, VIEW_OUTPUTS, BitsSlider, SafeImage, apply, load_recipe,
                              methods_if_shown, model_choices, predict, refresh, select_model, show_attention,
                              show_attribution, show_deploy, show_error_map, show_methods, show_ranges,
                              unavailable_note, warm_up, recipe_file)

# --- layout -------------------------------------------------------------------------------------

INTRO = """# SPIQ Explorer
Post-training quantization of an ImageNet classifier, live: **SPIQ** (Yvinec et al., WACV 2023) quantizes
each conv/linear input *per input channel* with ranges derived from BatchNorm statistics (no data) and folds
the per-channel scales into the weights. Compare it with per-tensor, calibrated and dynamic ranges, and see
*why* a setting works: channel ranges, per-layer error, error maps, attribution drift."""


# long: one page, laid out top to bottom as it appears, then its events
def build() -> gr.Blocks:
    default = QuantConfig()
    loaded = CACHE.load(DEFAULT_MODEL)
    with gr.Blocks(title="SPIQ Explorer", delete_cache=DELETE_CACHE) as demo:
        applied = gr.State(default.to_json())          # this user's recipe, as last applied
        applied_model = gr.State(DEFAULT_MODEL)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, label="Model", elem_id="model")
                with gr.Accordion("Models not available here, and why", open=False):
                    gr.Markdown(unavailable_note())
                method = gr.Dropdown(list(METHODS), value=default.method, label="Method", elem_id="method",
                                     info="spiq: data-free per-channel static; calib-* and liu-ptq (transformers "
                                          "only): calibrated on the example images")
                with gr.Row():
                    wbits = BitsSlider(2, 16, value=default.weight_bits, step=1, label="Weight bits", elem_id="wbits")
                    abits = BitsSlider(2, 16, value=default.input_bits, step=1, label="Input bits", elem_id="abits")
                with gr.Row():
                    wgran = gr.Radio(["channel", "tensor"], value="channel", label="Weight granularity")
                    igran = gr.Radio(["method default", "channel", "tensor"], value="method default",
                                     label="Input granularity")
                bias_fit = gr.Checkbox(value=True, label="Bias fit on distilled images", elem_id="bias-fit",
                                       info="sequential bias correction on images distilled from the BatchNorm "
                                            "statistics (data-free); the first use of a model distills them, "
                                            "which takes minutes (the default model's come ready)")
                apply_btn = gr.Button("Apply", variant="primary", elem_id="apply")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                image = SafeImage(value=EXAMPLES[0] if EXAMPLES else None, type="pil", image_mode=None,
                                  sources=["upload", "webcam", "clipboard"], label="Image", height=300,
                                  elem_id="image")
                examples = gr.Examples(EXAMPLES, inputs=image,
                                       label="Examples (freely licensed, see assets/LICENSES.md)")
        with gr.Accordion("Per-layer settings (edit, then Apply)", open=False):
            table = gr.Dataframe(views.layer_rows(loaded.model, default), headers=views.LAYER_TABLE_HEADERS,
                                 datatype=["str", "str", "number", "str", "number", "number", "str", "bool"],
                                 type="array", interactive=True, static_columns=[0, 1, 2], elem_id="layer-table")
        views_note = gr.Markdown(elem_id="views-note")
        methods_shown = gr.State(False)   # whether the Methods tab is the one in view
        with gr.Tabs() as tabs:
            with gr.Tab("Predictions", id="predictions"):
                pred_text = gr.Markdown(elem_id="pred-text")
                pred_plot = gr.Plot(label="Top-5, float vs quantized", elem_id="pred-plot")
            with gr.Tab("Story", id="story"):
                gr.Markdown("Float vs SPIQ vs per-tensor static at the applied bits, on one screen.")
                story_plot = gr.Plot(label="Story", elem_id="story-plot")
            with gr.Tab("Channel ranges", id="ranges"):
                range_layer = gr.Dropdown([], label="Layer", elem_id="range-layer")
                ranges_plot = gr.Plot(label="Channel ranges", elem_id="ranges-plot")
            with gr.Tab("Layer error", id="layer-error"):
                sqnr_plot = gr.Plot(label="SQNR per layer", elem_id="sqnr-plot")
                breakdown_plot = gr.Plot(label="Error sources", elem_id="breakdown-plot")
                fold_plot = gr.Plot(label="Fold cost (SPIQ layers)", elem_id="fold-plot")
                error_table = gr.Dataframe(headers=views.LAYER_ERROR_HEADERS, type="array", interactive=False)
            with gr.Tab("Error map", id="error-map"):
                with gr.Row():
                    map_layer = gr.Dropdown(["logits"], value="logits", label="Layer", elem_id="map-layer")
                    channel = gr.Number(None, precision=0, label="Channel (empty: mean over channels)")
                emap_plot = gr.Plot(label="Error map", elem_id="emap-plot")
            with gr.Tab("Attribution", id="attribution"):
                attr_method = gr.Radio(ATTRIBUTIONS, value="grad-cam", label="Attribution (captum)")
                attr_plot = gr.Plot(label="Attribution drift", elem_id="attr-plot")
            with gr.Tab("Attention", id="attention"):
                block = gr.Slider(0, 11, value=11, step=1, label="Block", visible=False, elem_id="block")
                attention_text = gr.Markdown(NO_ATTENTION, elem_id="attention-text")
                attention_plot = gr.Plot(label="Attention maps per head", elem_id="attention-plot")
                inversions_plot = gr.Plot(label="Rank inversions per block", elem_id="inversions-plot")
            with gr.Tab("Methods", id="methods") as methods_tab:
                methods_plot = gr.Plot(label="All methods on this image", elem_id="methods-plot")
                methods_table = gr.Dataframe(headers=views.METHODS_HEADERS, type="array", interactive=False)
            with gr.Tab("Deploy", id="deploy"):
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
            with gr.Tab("Recipe", id="recipe"):
                recipe = gr.Code(default.to_json(indent=2), language="json", label="Applied recipe", interactive=False)
                with gr.Row():
                    download = gr.DownloadButton("Download recipe JSON", value=recipe_file(default),
                                                 elem_id="download-recipe")
                    upload = gr.File(file_types=[".json"], type="filepath", label="Upload a recipe JSON")

        views_out = [story_plot, range_layer, ranges_plot, sqnr_plot, breakdown_plot, fold_plot, error_table,
                     map_layer, emap_plot, attr_plot, block, attention_plot, inversions_plot, attention_text, views_note]
        assert len(views_out) == VIEW_OUTPUTS
        refresh_in = [applied_model, applied, image, range_layer, map_layer, channel, attr_method, block]
        methods_in, methods_out = [applied_model, applied, image], [methods_plot, methods_table]

        def then_views(event, api_name=False):
            """Every view after `event`; the Methods tab's too while it is the one shown."""
            return event.success(refresh, refresh_in, views_out, api_name=api_name
                                 ).success(methods_if_shown, [methods_shown, *methods_in], methods_out, api_name=False)

        for tab in tabs.children:
            tab.select(lambda shown=tab is methods_tab: shown, None, methods_shown, api_name=False)
        methods_tab.select(show_methods, methods_in, methods_out, api_name="methods")

        controls = [method, wbits, abits, wgran, igran, bias_fit]
        then_views(model.change(select_model, [model, applied_model, *controls],
                                [applied_model, model, table, applied, status, method], api_name="select_model"
                                ).success(predict, [applied_model, applied, image], [pred_plot, pred_text], api_name=False))
        then_views(apply_btn.click(apply, [applied_model, applied, *controls, table, image],
                                   [applied, table, recipe, download, status, pred_plot, pred_text], api_name="apply"),
                   api_name="refresh")
        # Not image.change: Gradio's image empties itself when a new file starts uploading over a shown
        # one, so .change fires twice and both requests carry the new file (a bad file: its error twice).
        # .upload is once per file, pasted and webcam ones too; examples and Remove are wired apart.
        then_views(image.upload(predict, [applied_model, applied, image], [pred_plot, pred_text], api_name="predict",
                                trigger_mode="always_last"))
        then_views(examples.load_input_event.success(predict, [applied_model, applied, image], [pred_plot, pred_text],
                                                     api_name=False, trigger_mode="always_last"))
        image.clear(None, None, [pred_plot, pred_text], js=f"() => [null, {json.dumps(NO_IMAGE)}]", api_name=False)
        range_layer.input(show_ranges, [applied_model, applied, image, range_layer], ranges_plot, api_name="ranges")
        map_layer.input(show_error_map, [applied_model, applied, image, map_layer, channel], emap_plot,
                        api_name="error_map")
        channel.submit(show_error_map, [applied_model, applied, image, map_layer, channel], emap_plot, api_name=False)
        attr_method.input(show_attribution, [applied_model, applied, image, attr_method], attr_plot,
                          api_name="attribution")
        block.release(show_attention, [applied_model, applied, image, block],
                      [attention_plot, inversions_plot, attention_text], api_name="attention")
        deploy_btn.click(show_deploy, [applied_model, applied, image], [latency_plot, parity_plot, deploy_text, onnx_file],
                         api_name="deploy")
        # An uploaded recipe replaces the controls and the table, then is applied like a click on Apply.
        then_views(upload.upload(load_recipe, [upload, applied_model], [*controls, table, applied],
                                 api_name="load_recipe"
                                 ).success(apply, [applied_model, applied, *controls, table, image],
                                           [applied, table, recipe, download, status, pred_plot, pred_text],
                                           api_name=False))
        then_views(demo.load(predict, [applied_model, applied, image], [pred_plot, pred_text], api_name=False))
    return demo


demo = build()

if __name__ == "__main__":
    threading.Thread(target=warm_up, daemon=True).start()
    demo.queue(default_concurrency_limit=4).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                                                   max_file_size=MAX_UPLOAD_BYTES)
