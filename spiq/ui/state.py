"""The server's state, shared by every session of the app: one model cache, the admission of work
against a memory budget, the background distillation of other models' bias-fit images, and bounded
scratch folders for the files handed out.

Handlers read these as `state.CACHE` (never `from spiq.ui.state import CACHE`), so a test can put
its own in their place.
"""
from __future__ import annotations

import os

import gradio as gr

from spiq.config import QuantConfig
from spiq.core.memory import keep_freed_memory
from spiq.models.registry import get_spec, list_models, loadable
from spiq.ui import echo, limits, views
from spiq.ui.background import BackgroundDistiller
from spiq.ui.cache import ModelCache
from spiq.ui.page import ASSETS, DEFAULT_MODEL
from spiq.ui.scratch import ScratchDir

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


def recipe_file(config: QuantConfig) -> str:
    """The recipe's download: written once per recipe, into RECIPES."""
    path = RECIPES.entry(views.recipe_digest(config)) / "spiq_recipe.json"
    if not path.exists():
        path.write_text(config.to_json(indent=2) + "\n")
    return str(path)


def model_choices() -> list[tuple[str, str]]:
    """The model dropdown's (label, name) pairs: the models that cannot load here say so."""
    out = []
    for name in list_models():
        problem = loadable(name)
        out.append((name if problem is None else f"{name} (not available here)", name))
    return out


def unavailable_note() -> str:
    lines = [f"- `{n}`: {echo.markdown(p)}" for n in list_models() if (p := loadable(n)) is not None]
    return "\n".join(lines) if lines else "Every registered model is available."


def warm_up():
    """In the background after start: the data-free ranges of every bit width, then the other
    models' bias-fit images (unless SPIQ_BACKGROUND_DISTILL=0). The default recipe is quantized
    already: building the page computed its predictions (`page.first_predictions`)."""
    CACHE.warm(DEFAULT_MODEL)
    if os.environ.get("SPIQ_BACKGROUND_DISTILL", "1") != "0":
        BACKGROUND.start([n for n in list_models() if n != DEFAULT_MODEL and "cnn" in get_spec(n).tags
                          and loadable(n) is None])
