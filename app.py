"""SPIQ Explorer, the Gradio app: layout and wiring only. Every number and figure comes from `spiq.ui.views`.

Run `python app.py` (offline, with the embedded EfficientNet-Lite0); the same file is the entry
point of the Hugging Face Space.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import gradio as gr

from spiq.ui import views
from spiq.ui.cache import ModelCache
from spiq.config import METHODS, ConfigError, QuantConfig
from gradio.utils import get_upload_folder

from spiq.models.data import MAX_IMAGE_BYTES, ImageError, decode_data_url, open_allowed_image, open_image
from spiq.export.onnx import ExportError
from spiq.core.memory import keep_freed_memory
from spiq.quantize.api import check_config, methods_for
from spiq.models.registry import ModelUnavailableError, availability, list_models
from spiq.ui.scratch import ScratchDir

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "efficientnet_lite0"
# the cat first: at 4-bit inputs its top-1 flips under some methods and not others
EXAMPLES = [str(ASSETS / f) for f in ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg", "camera.jpg")]
ATTRIBUTIONS = ["grad-cam", "integrated-gradients"]
NO_ATTENTION = "Attention maps are for vision transformers; pick a DeiT or ViT model to see them."
VIEW_OUTPUTS = 15   # what `refresh` fills: the components of `views_out` in build()

keep_freed_memory()   # before the worker threads: each would get an arena of its own

# Files handed out, one entry per recipe and reused: a few exported models (~15 MB each) and the
# recipe downloads (bytes).
EXPORTS = ScratchDir("spiq-onnx-", max_entries=6)
RECIPES = ScratchDir("spiq-recipe-", max_entries=256)
DELETE_CACHE = (600, 1800)   # every 10 min, Gradio deletes uploads and copies older than 30 min
# Served in place rather than copied into Gradio's cache, so the bound above is the whole disk use.
gr.set_static_paths([EXPORTS.root, RECIPES.root])

CACHE = ModelCache(max_quantized=int(os.environ.get("SPIQ_CACHE_SIZE", "12")), calib_dir=ASSETS)


class SafeImage(gr.Image):
    """An image input decoded by spiq's own safe decoder, so a bad upload is a clear message.

    Whatever the payload claims, only files in Gradio's upload folder or the shipped examples are
    opened: a payload without Gradio's `meta` key skips Gradio's own check."""

    def get_block_name(self) -> str:
        return "image"  # the browser side is Gradio's own image component

    def preprocess(self, payload):
        if payload is None:
            return None
        try:
            if payload.url and payload.url.startswith("data:"):
                return open_image(decode_data_url(payload.url))
            return open_allowed_image(payload.path, (get_upload_folder(), ASSETS))
        except ImageError as exc:
            raise gr.Error(f"This image cannot be used: {exc}", title="Bad image") from None


class BitsSlider(gr.Slider):
    """A bit-width slider that refuses, by its own name, what the API can send it: 8.5, NaN, "8"."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        try:
            return views.control_bits(self.label, payload)
        except ConfigError as exc:
            raise gr.Error(str(exc)) from None


def user_errors(fn):
    """Errors a user can cause become a gr.Error with the library's message, server paths cut to
    their file names; the session stays usable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, ImageError, ModelUnavailableError, KeyError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise gr.Error(views.without_paths(str(msg))) from None
    return wrapper


def _need_image(image):
    if image is None:
        raise gr.Error("Pick an example or upload an image first.")
    return image


def _progress(progress: gr.Progress):
    """The library's progress callback as a Gradio progress bar, at most ten updates per task
    (every update is a message to the browser; fifty of them cost a quarter of a second)."""
    last = [-1.0]

    def report(fraction, message):
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            progress(fraction, desc=message)
    return report


# --- handlers -----------------------------------------------------------------------------------

def model_choices():
    out = []
    for name in list_models():
        problem = availability(name)
        out.append((name if problem is None else f"{name} (unavailable offline)", name))
    return out


def unavailable_note() -> str:
    lines = [f"- `{n}`: {views.without_paths(p)}" for n in list_models() if (p := availability(n)) is not None]
    return "\n".join(lines) if lines else "Every registered model is available."


def _controls(config: QuantConfig):
    return (config.method, config.weight_bits, config.input_bits, config.weight_granularity,
            config.input_granularity or "method default", config.bias_images != 0)


def _config_from_controls(applied: str, method, wbits, abits, wgran, igran, bias_fit, rows) -> QuantConfig:
    return views.config_from_controls(QuantConfig.from_json(applied), method, wbits, abits, wgran, igran, bias_fit, rows)


@user_errors
def select_model(name, applied_model, method, wbits, abits, wgran, igran, bias_fit, progress=gr.Progress()):
    problem = availability(name)
    if problem is not None:
        gr.Warning(views.without_paths(f"{name} cannot be used here: {problem}"))
        return applied_model, applied_model, gr.update(), gr.update(), gr.update(), gr.update()
    progress(0.1, desc=f"loading {name}")
    loaded = CACHE.load(name)
    # the controls carry over (but a method the model cannot take); per-layer overrides belong to
    # the previous model's layers
    method = method if method in methods_for(loaded.model) else QuantConfig().method
    config = _config_from_controls(QuantConfig().to_json(), method, wbits, abits, wgran, igran, bias_fit, None)
    return (name, name, views.layer_rows(loaded.model, config), config.to_json(),
            f"Loaded **{name}** with `{config.to_json()}`.", method)


@user_errors
def apply(model_name, applied, method, wbits, abits, wgran, igran, bias_fit, rows, image, progress=gr.Progress()):
    config = _config_from_controls(applied, method, wbits, abits, wgran, igran, bias_fit, rows)
    loaded = CACHE.load(model_name)
    progress(0, desc="quantizing")
    CACHE.quantized(model_name, config, _progress(progress))
    note = f"Applied `{config.to_json()}`"
    fig, text = (None, "Pick an example or upload an image.")
    if image is not None:
        sc = views.scene(CACHE, model_name, config, image)
        fig, text = views.predictions(CACHE, sc)
    return (config.to_json(), views.layer_rows(loaded.model, config), config.to_json(indent=2), _recipe_file(config),
            note, fig, text)


@user_errors
def predict(model_name, applied, image):
    if image is None:
        return None, "Pick an example or upload an image."
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), image)
    return views.predictions(CACHE, sc)


@user_errors
def refresh(model_name, applied, image, range_layer, map_layer, channel, attr_method, block,
            progress=gr.Progress()):
    """Every analysis view for the current image and recipe."""
    if image is None:  # a cleared image: keep the last views
        return [gr.update()] * VIEW_OUTPUTS
    config = QuantConfig.from_json(applied)
    progress(0.0, desc="quantizing")
    sc = views.scene(CACHE, model_name, config, image)
    ranges_layers, map_layers = sc.range_layers, ["logits", *sc.map_layers]
    range_layer = range_layer if range_layer in ranges_layers else _default_range_layer(ranges_layers)
    map_layer = map_layer if map_layer in map_layers else "logits"
    progress(0.1, desc="story")
    story = views.story(CACHE, model_name, config, image)
    progress(0.2, desc="channel ranges")
    ranges = views.channel_ranges(CACHE, sc, range_layer) if range_layer else None
    progress(0.3, desc="layer error")
    sqnr, breakdown, fold, table = views.layer_error(CACHE, sc)
    progress(0.5, desc="error map")
    emap = views.error_map(CACHE, sc, map_layer, _channel(channel))
    progress(0.6, desc="attribution")
    attr = views.attribution(CACHE, sc, attr_method)
    progress(0.8, desc="attention")
    attention = _attention(sc, block)
    return (story, gr.update(choices=ranges_layers, value=range_layer), ranges, sqnr, breakdown, fold, table,
            gr.update(choices=map_layers, value=map_layer), emap, attr,
            *attention, f"Views show `{config.to_json()}` on `{model_name}`.")


@user_errors
def show_methods(model_name, applied, image, progress=gr.Progress()):
    """The Methods tab: after new bits every method quantizes anew (each with its own bias fit),
    over a second of work, so it is drawn when the tab is shown rather than on every refresh."""
    if image is None:
        return gr.update(), gr.update()
    fig, rows = views.methods(CACHE, model_name, QuantConfig.from_json(applied), image, _progress(progress))
    return fig, views.methods_table(rows)


def methods_if_shown(shown, model_name, applied, image, progress=gr.Progress()):
    return show_methods(model_name, applied, image, progress) if shown else (gr.update(), gr.update())


def _attention(sc, block):
    if not views.is_transformer(sc.qmodel):
        return gr.update(visible=False), None, None, NO_ATTENTION
    last = len(sc.qmodel.blocks) - 1
    block = min(int(block), last) if block is not None else last
    maps, inversions, text = views.attention(CACHE, sc, block)
    return gr.update(visible=True, maximum=last, value=block), maps, inversions, text


def _default_range_layer(layers):
    # a wide pointwise projection in the middle of the network shows the per-channel spread best
    return "blocks.5.0.conv_pwl" if "blocks.5.0.conv_pwl" in layers else (layers[len(layers) // 2] if layers else None)


def _channel(channel):
    if channel is None or channel == "":
        return None
    if float(channel) != int(channel):
        raise ValueError(f"channel must be a whole number, got {channel}")
    return int(channel)


@user_errors
def show_ranges(model_name, applied, image, layer):
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    return views.channel_ranges(CACHE, sc, layer)


@user_errors
def show_error_map(model_name, applied, image, layer, channel):
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    return views.error_map(CACHE, sc, layer, _channel(channel) if layer != "logits" else None)


@user_errors
def show_attention(model_name, applied, image, block):
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    if not views.is_transformer(sc.qmodel):
        raise gr.Error(NO_ATTENTION)
    return views.attention(CACHE, sc, int(block))


@user_errors
def show_attribution(model_name, applied, image, method, progress=gr.Progress()):
    progress(0.1, desc=f"{method} on both models")
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    return views.attribution(CACHE, sc, method)


def _recipe_file(config: QuantConfig) -> str:
    path = RECIPES.entry(views.recipe_digest(config)) / "spiq_recipe.json"
    if not path.exists():
        path.write_text(config.to_json(indent=2) + "\n")
    return str(path)


@user_errors
def load_recipe(file, model_name):
    if file is None:
        raise gr.Error("Choose a recipe JSON file first.")
    config = views.read_recipe(file, (get_upload_folder(),))
    loaded = CACHE.load(model_name)
    check_config(loaded.model, config)   # before the session takes it: a bad recipe leaves it as it was
    return (*_controls(config), views.layer_rows(loaded.model, config), config.to_json())


@user_errors
def show_deploy(model_name, applied, image, progress=gr.Progress()):
    config = QuantConfig.from_json(applied)
    try:
        return views.deploy(CACHE, model_name, config, _need_image(image), EXPORTS, _progress(progress))
    except ExportError as exc:
        raise gr.Error(views.without_paths(f"This recipe cannot be exported to int8: {exc}")) from None


def warm_up():
    """Load the default model and search its data-free ranges in the background after start."""
    CACHE.warm(DEFAULT_MODEL)


# --- layout -------------------------------------------------------------------------------------

INTRO = """# SPIQ Explorer
Post-training quantization of an ImageNet classifier, live: **SPIQ** (Yvinec et al., WACV 2023) quantizes
each conv/linear input *per input channel* with ranges derived from BatchNorm statistics (no data) and folds
the per-channel scales into the weights. Compare it with per-tensor, calibrated and dynamic ranges, and see
*why* a setting works: channel ranges, per-layer error, error maps, attribution drift."""


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
                gr.Examples(EXAMPLES, inputs=image, label="Examples (freely licensed, see assets/LICENSES.md)")
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
                    download = gr.DownloadButton("Download recipe JSON", value=_recipe_file(default),
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
        then_views(image.change(predict, [applied_model, applied, image], [pred_plot, pred_text], api_name="predict"))
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
                                                   max_file_size=MAX_IMAGE_BYTES)
