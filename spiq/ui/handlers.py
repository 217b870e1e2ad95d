"""The app's event handlers and input components: every Gradio callback of `app.py`, each turning a
user's request into calls of `spiq.ui.views` and Gradio's own errors, progress and updates.

Module state is the server's: one model cache, bounded scratch folders for files handed out.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time

import gradio as gr
from gradio.utils import get_upload_folder

from spiq.core.errors import SpiqError
from spiq.config import ConfigError, QuantConfig
from spiq.core.memory import keep_freed_memory
from spiq.export.onnx import ExportError
from spiq.models.registry import get_spec, list_models, loadable
from spiq.quantize.api import check_config, methods_for
from spiq.quantize.biasfit import bias_images_for
from spiq.ui import advisor, echo, limits, tabs, views
from spiq.ui.background import FAILED, BackgroundDistiller
from spiq.ui.cache import ModelCache
from spiq.ui.page import ASSETS, DEFAULT_MODEL, link_state
from spiq.ui.scratch import ScratchDir

ATTRIBUTIONS = ["grad-cam", "integrated-gradients"]
NO_IMAGE = "Pick an example or upload an image."
NO_ATTENTION = "Attention maps are for vision transformers; pick a DeiT or ViT model to see them."
NO_LAW = "No layer of this model has a data-free law to compare with."
VIEW_OUTPUTS = 15   # what `refresh` fills: the components of `views_out` in build()
# What a tab's view fills: `views_out`, then the Methods tab's figure and table, the Advisor's
# summary, figure and table, and the Law tab's layer, channel, two figures and text.
TAB_OUTPUTS = VIEW_OUTPUTS + 10
# Where each tab's result goes among the TAB_OUTPUTS (14 is the note saying what the views show).
_SLOTS = {"story": (0,), "ranges": (1, 2), "layer-error": (3, 4, 5, 6), "error-map": (7, 8), "attribution": (9,),
          "attention": (10, 11, 12, 13), "methods": (15, 16), "advisor": (17, 18, 19), "law": (20, 21, 22, 23, 24)}
NOTE_SLOT = 14

keep_freed_memory()   # before the worker threads: each would get an arena of its own

# Files handed out, one entry per recipe and reused: a few exported models (~15 MB each) and the
# recipe downloads (bytes).
EXPORTS = ScratchDir("spiq-onnx-", max_entries=6)
RECIPES = ScratchDir("spiq-recipe-", max_entries=256)
DELETE_CACHE = (600, 1800)   # every 10 min, Gradio deletes uploads and copies older than 30 min
# Served in place rather than copied into Gradio's cache, so the bound above is the whole disk use.
gr.set_static_paths([EXPORTS.root, RECIPES.root])

# Bias-fit images are distilled only in the background (BACKGROUND), never inside a request.
CACHE = ModelCache(max_quantized=int(os.environ.get("SPIQ_CACHE_SIZE", "12")), calib_dir=ASSETS,
                   distill_inline=False)
ADMISSION = limits.Admission(limits.memory_budget())
CACHE.pin(DEFAULT_MODEL, QuantConfig())   # every new page's first predictions
# The other models' bias-fit images, distilled after start (warm_up) so no visitor waits minutes.
BACKGROUND = BackgroundDistiller()


def user_errors(fn):
    """Errors a user can cause become a gr.Error with the library's message, server paths cut to
    their file names; the session stays usable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpiqError as exc:   # any other exception is a bug: Gradio shows a generic error
            raise gr.Error(echo.plain(exc)) from None
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
        problem = loadable(name)
        out.append((name if problem is None else f"{name} (not available here)", name))
    return out


def unavailable_note() -> str:
    lines = [f"- `{n}`: {echo.markdown(p)}" for n in list_models() if (p := loadable(n)) is not None]
    return "\n".join(lines) if lines else "Every registered model is available."


def _controls(config: QuantConfig):
    return (config.method, config.weight_bits, config.input_bits, config.weight_granularity,
            config.input_granularity or "method default", config.bias_images != 0)


def _config_from_controls(applied: str, method, wbits, abits, wgran, igran, bias_fit, rows) -> QuantConfig:
    return views.config_from_controls(QuantConfig.from_json(applied), method, wbits, abits, wgran, igran, bias_fit, rows)


def _fit_waits(name: str) -> bool:
    """Whether `name`'s bias-fit images are still being distilled in the background."""
    return BACKGROUND.pending(name) and not CACHE.fit_ready(name)


def _runnable(model_name: str, config: QuantConfig) -> QuantConfig:
    """`config` if the public app runs it on `model_name` now, before any work and before a session
    takes it: its fields within the app's limits, its bias-fit images already distilled."""
    limits.check_recipe(config)
    if config.bias_images is None and _fit_waits(model_name):
        raise ConfigError(f"Bias-fit images for {model_name} are still being distilled in the background. "
                          "Untick Bias fit to apply now; the note under it says when the fit is ready.")
    CACHE.check_fit(model_name, config)
    return config


def _work(model_name: str, images: int, copies: int = 3):
    """Admission of work on `images` images at once (see limits.Admission), before it starts."""
    return ADMISSION.admit(CACHE.footprint(model_name).cost(images, copies))


# A view holds a few layers' activations for one image, Integrated Gradients 8 images with their
# gradients, the advisor's probes 4 images twice; an export copies the weights a few times over.
VIEW_IMAGES, DEPLOY_COPIES = 8, 8


def admitted(images: int = VIEW_IMAGES, copies: int = 3):
    """The handler's work on its `model_name`, admitted before it starts (see `_work`)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _work(signature.bind_partial(*args, **kwargs).arguments["model_name"], images, copies):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def _recipe_images(model_name: str, config: QuantConfig) -> int:
    """Images quantizing `config` runs at once: its bias fit's, or a batch of calibration images
    (`run_with_hooks` observes 16 at a time)."""
    fit = bias_images_for(config, CACHE.load(model_name).model)
    return max(1, fit, 16 if config.needs_calibration else 0)


def fit_status(name: str):
    """The note under Bias fit for model `name`, and whether to keep asking (the Timer)."""
    job = BACKGROUND.state(name)
    if job is None:
        return "", gr.Timer(active=False)
    if _fit_waits(name):
        return (f"Bias-fit images for **{echo.markdown(name)}** are being distilled in the background ({job.state}); "
                "until they are ready, this model runs with the fit off. This note says when.", gr.Timer(active=True))
    if job.state == FAILED and not CACHE.fit_ready(name):
        return (f"Distilling **{echo.markdown(name)}**'s bias-fit images in the background failed "
                f"({echo.markdown(job.message)}); this model runs with the fit off here.", gr.Timer(active=False))
    return (f"Bias-fit images for **{echo.markdown(name)}** are ready: tick Bias fit and Apply to use them.",
            gr.Timer(active=False))


@user_errors
def select_model(name, applied_model, method, wbits, abits, wgran, igran, bias_fit, progress=gr.Progress()):
    problem = loadable(name)
    if problem is not None:
        gr.Warning(echo.plain(f"{name} cannot be used here: {problem}"))
        return applied_model, applied_model, *[gr.update()] * 7
    progress(0.1, desc=f"loading {name}")
    loaded = CACHE.load(name)
    # the controls carry over (but a method the model cannot take); per-layer overrides belong to
    # the previous model's layers
    method = method if method in methods_for(loaded.model) else QuantConfig().method
    bias_fit = bias_fit and CACHE.fit_ready(name)   # usable at once, with the fit off
    config = _config_from_controls(QuantConfig().to_json(), method, wbits, abits, wgran, igran, bias_fit, None)
    return (name, name, views.layer_rows(loaded.model, config), config.to_json(),
            f"Loaded **{echo.markdown(name)}** with {echo.code(config.to_json())}.", method, bias_fit,
            *fit_status(name))


@user_errors
def apply(model_name, applied, method, wbits, abits, wgran, igran, bias_fit, rows, image, progress=gr.Progress()):
    config = _runnable(model_name, _config_from_controls(applied, method, wbits, abits, wgran, igran, bias_fit, rows))
    loaded = CACHE.load(model_name)
    progress(0, desc="quantizing")
    with _work(model_name, _recipe_images(model_name, config)):
        CACHE.quantized(model_name, config, _progress(progress))
    note = f"Applied {echo.code(config.to_json())}"
    fig, text = (None, NO_IMAGE)
    if image is not None:
        with CACHE.lock.urgent():
            sc = views.scene(CACHE, model_name, config, image)
            fig, text = views.predictions(CACHE, sc)
    return (config.to_json(), views.layer_rows(loaded.model, config), config.to_json(indent=2), recipe_file(config),
            note, fig, text)


@user_errors
def predict(model_name, applied, image):
    if image is None:
        return None, NO_IMAGE
    config = QuantConfig.from_json(applied)
    # a recipe not quantized yet (a link's) is work like Apply's; a cached one is a forward pass
    work = (contextlib.nullcontext() if CACHE.has_quantized(model_name, config)
            else _work(model_name, _recipe_images(model_name, config)))
    with work, CACHE.lock.urgent():   # before the next step of anyone's views
        sc = views.scene(CACHE, model_name, config, image)
        return views.predictions(CACHE, sc)


def _request(model_name, applied, image, range_layer, map_layer, channel, attr_method, block, budget=None,
             law_layer=None, law_channel=None) -> tabs.Request:
    return tabs.Request(model_name, QuantConfig.from_json(applied), image, tabs.image_digest(image), range_layer,
                        map_layer, _whole("channel", channel), attr_method or "grad-cam",
                        _whole("block", block), _budget(budget), law_layer, _whole("channel", law_channel))


def _budget(budget) -> float:
    return advisor.DEFAULT_BUDGET if budget is None else limits.check_budget(budget)


def _tab_updates(tab: str, result, req: tabs.Request) -> list:
    """A tab's result as updates of the TAB_OUTPUTS; the other tabs' components are left as they are."""
    out = [gr.update()] * TAB_OUTPUTS
    if tab in ("ranges", "error-map"):
        layers, layer, fig = result
        values = (gr.update(choices=layers, value=layer), fig)
    elif tab == "attention":
        values = ((gr.update(visible=False), None, None, NO_ATTENTION) if result is None else
                  (gr.update(visible=True, maximum=result[0], value=result[1]), *result[2:]))
    elif tab == "law":
        values = ((gr.update(choices=[], value=None), None, None, None, NO_LAW) if result is None else
                  (gr.update(choices=result[0], value=result[1]), *result[2:]))
    else:
        values = result if isinstance(result, tuple) else (result,)
    for slot, value in zip(_SLOTS[tab], values, strict=True):
        out[slot] = value
    out[NOTE_SLOT] = f"Views show {echo.code(req.config.to_json())} on {echo.code(req.model)}."
    return out


@user_errors
def open_tab(tab, drawn, model_name, applied, image, range_layer, map_layer, channel, attr_method, block, budget=None,
             law_layer=None, law_channel=None):
    """A tab comes into view, or the shown tab's model, recipe or image changed: what it shows
    already stays, a view computed before is sent, and anything else becomes a job for
    `compute_tab` (a value of the `job` state, whose change starts it). Never computes, so it
    answers at once however busy the server is.

    Returns (shown tab, drawn, job, *TAB_OUTPUTS); `drawn` maps each tab to what it shows."""
    idle = (tab, gr.update(), gr.update(), *[gr.update()] * TAB_OUTPUTS)
    if image is None or tab not in tabs.TABS:   # a cleared image: keep the last views
        return idle
    req = _request(model_name, applied, image, range_layer, map_layer, channel, attr_method, block, budget, law_layer,
                   law_channel)
    drawn, shows = drawn or {}, tabs.drawn(CACHE, req, tab)
    now = time.time()
    if drawn.get(tab) == shows or _pending(drawn.get(tab), shows, now):
        return idle
    found, result = tabs.cached(CACHE, req, tab)
    if found:
        return (tab, {**drawn, tab: shows}, gr.update(), *_tab_updates(tab, result, req))
    # marked pending, so the same tab asked again meanwhile (a page load selects it too) is one job
    return (tab, {**drawn, tab: [shows, now]}, {"tab": tab, "request": shows, "at": now},
            *[gr.update()] * TAB_OUTPUTS)


# A job not done after this long is asked again when its tab comes into view (it may have failed).
PENDING_S = 60.0


def _pending(entry, shows: str, now: float) -> bool:
    return isinstance(entry, list) and entry[0] == shows and now - entry[1] < PENDING_S


@user_errors
@admitted()
def compute_tab(job, drawn, model_name, applied, image, range_layer, map_layer, channel, attr_method, block,
                budget=None, law_layer=None, law_channel=None, progress=gr.Progress()):
    """The tab a job names, for the session's current request. Returns (drawn, *TAB_OUTPUTS)."""
    if not job or image is None:
        return (gr.update(), *[gr.update()] * TAB_OUTPUTS)
    tab = job["tab"]
    req = _request(model_name, applied, image, range_layer, map_layer, channel, attr_method, block, budget, law_layer,
                   law_channel)
    result = tabs.compute(CACHE, req, tab, _progress(progress))
    return ({**(drawn or {}), tab: tabs.drawn(CACHE, req, tab)}, *_tab_updates(tab, result, req))


# What `refresh` computes, in order, with the progress shown before each step.
_REFRESH = ((0.1, "story", "story"), (0.2, "ranges", "channel ranges"), (0.3, "layer-error", "layer error"),
            (0.5, "error-map", "error map"), (0.6, "attribution", "attribution"), (0.8, "attention", "attention"))


@user_errors
@admitted()
def refresh(model_name, applied, image, range_layer, map_layer, channel, attr_method, block,
            progress=gr.Progress()):
    """Every analysis view but Methods for the current image and recipe, at once: an API endpoint
    (the page computes each tab when it is shown). Results are shared with the tabs' cache."""
    if image is None:  # a cleared image: keep the last views
        return [gr.update()] * VIEW_OUTPUTS
    progress(0.0, desc="quantizing")
    req = _request(model_name, applied, image, range_layer, map_layer, channel, attr_method, block)
    views.scene(CACHE, model_name, req.config, image)
    out = [gr.update()] * TAB_OUTPUTS
    for fraction, tab, desc in _REFRESH:
        progress(fraction, desc=desc)
        updates = _tab_updates(tab, tabs.compute(CACHE, req, tab), req)
        for slot in (*_SLOTS[tab], NOTE_SLOT):
            out[slot] = updates[slot]
    return out[:VIEW_OUTPUTS]


@user_errors
@admitted()
def show_methods(model_name, applied, image, progress=gr.Progress()):
    """The Methods tab as an API endpoint: after new bits every method quantizes anew (each with its
    own bias fit), over a second of work."""
    if image is None:
        return gr.update(), gr.update()
    req = _request(model_name, applied, image, None, None, None, None, None)
    return tabs.compute(CACHE, req, "methods", _progress(progress))


def _layer(layer) -> str | None:
    """A layer dropdown's value: a name (checked against the model where it is used), or None."""
    if layer is not None and not isinstance(layer, str):
        raise ConfigError(f"a layer is named by a string, got {type(layer).__name__}")
    return layer or None


def _whole(what: str, value) -> int | None:
    """A channel or block number as a client sent it: empty, or a whole number named when it is not."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"{what} must be a whole number, got {str(value)[:40]!r}")
    return int(value)



@user_errors
@admitted()
def show_ranges(model_name, applied, image, layer):
    """One layer's channel ranges; without a layer (an API client's first call), the tab's own."""
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    layer = _layer(layer) or views.default_range_layer(CACHE, sc)
    if layer is None:
        raise gr.Error("No layer of this model has a data-free range to show.")
    return views.channel_ranges(CACHE, sc, layer)


@user_errors
@admitted()
def show_law(model_name, applied, image, layer, channel):
    """The Law tab for another layer (its default channel) or channel: (channel, histogram, scatter, text)."""
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    layer = _layer(layer) or advisor.default_law_layer(CACHE, sc)
    if layer is None:
        raise gr.Error(NO_LAW)
    return advisor.law(CACHE, sc, layer, _whole("channel", channel))


@user_errors
@admitted()
def show_advisor(model_name, applied, budget, progress=gr.Progress()):
    """The Advisor tab at another budget: (summary, figure, rows); measures first if it has not."""
    return advisor.advisor(CACHE, model_name, QuantConfig.from_json(applied), _budget(budget), _progress(progress))


@user_errors
@admitted()
def fill_advice(model_name, applied, budget, progress=gr.Progress()):
    """The advice at `budget` as the session's controls, per-layer table and recipe, to be applied
    as an uploaded recipe is. Returns (*controls, table rows, recipe JSON)."""
    config = QuantConfig.from_json(applied)
    table = advisor.sensitivity_table(CACHE, model_name, config, _progress(progress))
    advice = advisor.advice_for(table, config, _budget(budget))
    return (*_controls(advice.config), views.layer_rows(CACHE.load(model_name).model, advice.config),
            advice.config.to_json())


@user_errors
@admitted()
def show_error_map(model_name, applied, image, layer, channel):
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    return views.error_map(CACHE, sc, layer, _whole("channel", channel) if layer != "logits" else None)


@user_errors
@admitted()
def show_attention(model_name, applied, image, block):
    sc = views.scene(CACHE, model_name, QuantConfig.from_json(applied), _need_image(image))
    if not views.is_transformer(sc.qmodel.model):
        raise gr.Error(NO_ATTENTION)
    return views.attention(CACHE, sc, _whole("block", block))


@user_errors
@admitted()
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
    _runnable(model_name, config)
    return (*_controls(config), views.layer_rows(loaded.model, config), config.to_json())


def open_link(model_name, request: gr.Request):
    """On page load: the state a link carries (query parameters `recipe` and `example`), checked
    like an uploaded recipe. A bad link is a warning naming what is wrong, and the default state.
    Returns (*controls, table, applied recipe, image, status, recipe JSON, recipe download,
    prediction plot and text, linked): `linked` says the page is not the default one, whose
    predictions it was drawn with; those are cleared until the link's own arrive."""
    keep = [gr.update()] * 14 + [False]
    query = dict(request.query_params) if request is not None else {}
    if not query.keys() & {"recipe", "example"}:
        return keep
    try:
        config, example = link_state(CACHE, query, model_name)
        if config is not None:
            _runnable(model_name, config)
    except SpiqError as exc:
        gr.Warning(echo.plain(f"This link cannot be opened: {exc}"), title="Bad link",
                   duration=None)   # stays until closed: the visitor must see why the page is not the link's
        return keep
    out = keep
    if config is not None:
        loaded = CACHE.load(model_name)
        out[:12] = [*_controls(config), views.layer_rows(loaded.model, config), config.to_json(), gr.update(),
                    f"Restored from the link: {echo.code(config.to_json())}.", config.to_json(indent=2),
                    recipe_file(config)]
    if example is not None:
        out[8] = example
    out[12:] = [None, "Computing the link's predictions…", True]
    return out


def predict_linked(linked, model_name, applied, image):
    """A link's predictions; a default page keeps those it was drawn with (`first_predictions`)."""
    return predict(model_name, applied, image) if linked else (gr.skip(), gr.skip())


@user_errors
@admitted(copies=DEPLOY_COPIES)
def show_deploy(model_name, applied, image, progress=gr.Progress()):
    config = QuantConfig.from_json(applied)
    try:
        return views.deploy(CACHE, model_name, config, _need_image(image), EXPORTS, _progress(progress))
    except ExportError as exc:
        raise gr.Error(echo.plain(f"This recipe cannot be exported to int8: {exc}")) from None


def warm_up():
    """In the background after start: the data-free ranges of every bit width, then the other
    models' bias-fit images (unless SPIQ_BACKGROUND_DISTILL=0). The default recipe is quantized
    already: building the page computed its predictions (`page.first_predictions`)."""
    CACHE.warm(DEFAULT_MODEL)
    if os.environ.get("SPIQ_BACKGROUND_DISTILL", "1") != "0":
        BACKGROUND.start([n for n in list_models() if n != DEFAULT_MODEL and "cnn" in get_spec(n).tags
                          and loadable(n) is None])
