"""The app's event handlers and input components: every Gradio callback of `app.py`, each turning a
user's request into calls of `spiq.ui.views` and Gradio's own errors, progress and updates.

Module state is the server's: one model cache, bounded scratch folders for files handed out.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from spiq.config import ConfigError, QuantConfig
from spiq.core.memory import keep_freed_memory
from spiq.export.onnx import ExportError
from spiq.models.data import MAX_IMAGE_BYTES, ImageError, decode_data_url, open_allowed_image, open_image
from spiq.models.registry import ModelUnavailableError, availability, list_models
from spiq.quantize.api import check_config, methods_for
from spiq.ui import views
from spiq.ui.cache import ModelCache
from spiq.ui.scratch import ScratchDir

# The example photos beside the package (app.py runs from the repository).
ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_MODEL = "efficientnet_lite0"
# In the order bench/order_examples.py chose: first the one that shows SPIQ's point at first sight.
EXAMPLES = [str(ASSETS / f) for f in (ASSETS / "examples.txt").read_text().split()]
ATTRIBUTIONS = ["grad-cam", "integrated-gradients"]
NO_IMAGE = "Pick an example or upload an image."
NO_ATTENTION = "Attention maps are for vision transformers; pick a DeiT or ViT model to see them."
VIEW_OUTPUTS = 15   # what `refresh` fills: the components of `views_out` in build()

keep_freed_memory()   # before the worker threads: each would get an arena of its own

# Files handed out, one entry per recipe and reused: a few exported models (~15 MB each) and the
# recipe downloads (bytes).
EXPORTS = ScratchDir("spiq-onnx-", max_entries=6)
RECIPES = ScratchDir("spiq-recipe-", max_entries=256)
# Gradio refuses larger uploads itself; SafeImage holds data URLs to the same limit.
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
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
    fig, text = (None, NO_IMAGE)
    if image is not None:
        sc = views.scene(CACHE, model_name, config, image)
        fig, text = views.predictions(CACHE, sc)
    return (config.to_json(), views.layer_rows(loaded.model, config), config.to_json(indent=2), recipe_file(config),
            note, fig, text)


@user_errors
def predict(model_name, applied, image):
    if image is None:
        return None, NO_IMAGE
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
    range_layer = range_layer if range_layer in ranges_layers else views.default_range_layer(CACHE, sc)
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
    if not views.is_transformer(sc.qmodel.model):
        return gr.update(visible=False), None, None, NO_ATTENTION
    last = len(sc.qmodel.model.blocks) - 1
    block = min(int(block), last) if block is not None else last
    maps, inversions, text = views.attention(CACHE, sc, block)
    return gr.update(visible=True, maximum=last, value=block), maps, inversions, text


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
    if not views.is_transformer(sc.qmodel.model):
        raise gr.Error(NO_ATTENTION)
    return views.attention(CACHE, sc, int(block))


@user_errors
def show_attribution(model_name, applied, image, method, progress=gr.Progress()):
    progress(0.1, desc=f"{method} on both models")
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    return views.attribution(CACHE, sc, method)


def recipe_file(config: QuantConfig) -> str:
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
