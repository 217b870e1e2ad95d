"""The steps every event handler of the app shares: what a request sent, parsed and checked once at
the handler's entry (the recipe into a `QuantConfig`, channel and block numbers, the budget), its
work admitted against the memory budget before it starts, its progress shown, and the errors a
user can cause turned into Gradio's.
"""
from __future__ import annotations

import functools
import inspect

import gradio as gr

from spiq.config import ConfigError, QuantConfig
from spiq.core.errors import SpiqError
from spiq.quantize.biasfit import bias_images_for
from spiq.ui import advisor, echo, limits, state

NO_IMAGE = "Pick an example or upload an image."
# A view holds a few layers' activations for one image, Integrated Gradients 8 images with their
# gradients, the advisor's probes 4 images twice; an export copies the weights a few times over.
VIEW_IMAGES, DEPLOY_COPIES = 8, 8
# Event groups of the queue (concurrency_id: limit). Predictions, and views answered from the
# cache, never wait in a group behind the expensive work: quantizing, computing a view (Integrated
# Gradients, Methods: seconds), exporting.
GROUPS = {"predict": 4, "cheap": 8, "apply": 2, "views": 2, "deploy": 1}


def group(name: str) -> dict:
    """An event's queue group, as keyword arguments of its registration."""
    return {"concurrency_id": name, "concurrency_limit": GROUPS[name]}


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


def recipe(applied: str) -> QuantConfig:
    """The session's applied recipe, kept as JSON text in its `gr.State`, as a QuantConfig: parsed
    here once at the entry of each handler, then passed down."""
    return QuantConfig.from_json(applied)


def need_image(image):
    if image is None:
        raise gr.Error("Pick an example or upload an image first.")
    return image


def progress_bar(progress: gr.Progress):
    """The library's progress callback as a Gradio progress bar, at most ten updates per task
    (every update is a message to the browser; fifty of them cost a quarter of a second)."""
    last = [-1.0]

    def report(fraction, message):
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            progress(fraction, desc=message)
    return report


def whole(what: str, value) -> int | None:
    """A channel or block number as a client sent it: empty, or a whole number named when it is not."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"{what} must be a whole number, got {str(value)[:40]!r}")
    return int(value)


def layer_name(layer) -> str | None:
    """A layer dropdown's value: a name (checked against the model where it is used), or None."""
    if layer is not None and not isinstance(layer, str):
        raise ConfigError(f"a layer is named by a string, got {type(layer).__name__}")
    return layer or None


def budget(value) -> float:
    """The Advisor's budget as sent: the default when absent, else checked (limits.check_budget)."""
    return advisor.DEFAULT_BUDGET if value is None else limits.check_budget(value)


def fit_waits(name: str) -> bool:
    """Whether `name`'s bias-fit images are still being distilled in the background."""
    return state.BACKGROUND.pending(name) and not state.CACHE.fit_ready(name)


def runnable(model_name: str, config: QuantConfig) -> QuantConfig:
    """`config` if the public app runs it on `model_name` now, before any work and before a session
    takes it: its fields within the app's limits, its bias-fit images already distilled."""
    limits.check_recipe(config)
    if config.bias_images is None and fit_waits(model_name):
        raise ConfigError(f"Bias-fit images for {model_name} are still being distilled in the background. "
                          "Untick Bias fit to apply now; the note under it says when the fit is ready.")
    state.CACHE.check_fit(model_name, config)
    return config


def work(model_name: str, images: int, copies: int = 3):
    """Admission of work on `images` images at once (see limits.Admission), before it starts."""
    return state.ADMISSION.admit(state.CACHE.footprint(model_name).cost(images, copies))


def admitted(images: int = VIEW_IMAGES, copies: int = 3):
    """The handler's work on its `model_name`, admitted before it starts (see `work`)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with work(signature.bind_partial(*args, **kwargs).arguments["model_name"], images, copies):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def recipe_images(model_name: str, config: QuantConfig) -> int:
    """Images quantizing `config` runs at once: its bias fit's, or a batch of calibration images
    (`run_with_hooks` observes 16 at a time)."""
    fit = bias_images_for(config, state.CACHE.load(model_name).model)
    return max(1, fit, 16 if config.needs_calibration else 0)
