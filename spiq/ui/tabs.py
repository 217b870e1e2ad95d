"""The analysis tabs as units of work: what each one computes for a request, kept in the cache's
bounded LRU of views, so going back to a tab, an image or a recipe is answered without computing.

A tab is computed when it is shown, never for a tab nobody looks at: on a 2-core server every
view computed ahead of time delays other visitors' predictions. No Gradio here; the handlers turn
the results into component updates.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from spiq.core.errors import UnknownNameError
from spiq.config import QuantConfig
from spiq.ui import advisor, views
from spiq.ui.cache import ModelCache, config_key

# The tab ids of app.py, in the order they are laid out.
TABS = ("story", "ranges", "law", "layer-error", "error-map", "attribution", "attention", "methods", "advisor")
# The options of a request each tab's result depends on (besides model, recipe and image).
OPTIONS = {"ranges": ("range_layer",), "law": ("law_layer", "law_channel"), "error-map": ("map_layer", "channel"),
           "attribution": ("attr_method",), "attention": ("block",), "advisor": ("budget",)}


def image_digest(image: Image.Image) -> str:
    """Names the pixels, so the same photo sent again (another session, an example) finds its views."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Request:
    """One session's request for a tab: the applied model and recipe, the image and the tabs' options."""
    model: str
    config: QuantConfig
    image: Image.Image
    digest: str
    range_layer: str | None = None
    map_layer: str | None = None
    channel: int | None = None
    attr_method: str = "grad-cam"
    block: int | None = None
    budget: float = advisor.DEFAULT_BUDGET
    law_layer: str | None = None
    law_channel: int | None = None

    def drawn(self) -> str:
        """What a tab drawn for this request shows, but for its own options (which its own controls
        redraw): a tab whose drawn value is this needs no request when it comes into view again."""
        return f"{self.model}|{config_key(self.config)}|{self.digest}"

    def key(self, tab: str) -> tuple:
        if tab not in TABS:
            raise UnknownNameError(f"unknown view {tab!r}; the views are {', '.join(TABS)}")
        return (self.model, config_key(self.config), self.digest, tab,
                *(getattr(self, o) for o in OPTIONS.get(tab, ())))


def _marks(cache: ModelCache, req: Request, tab: str) -> tuple:
    """What a tab shows beyond its request: the layer-error view marks the layers the advisor raises
    at the session's budget once the advisor has measured this model and recipe."""
    if tab == "layer-error" and advisor.has_table(cache, req.model, req.config):
        return (req.budget,)
    return ()


def drawn(cache: ModelCache, req: Request, tab: str) -> str:
    """`req.drawn()` for `tab`, with what it marks: a layer-error view drawn before the advisor
    measured is drawn again when it comes into view."""
    return "|".join([req.drawn(), *map(str, _marks(cache, req, tab))])


def cached(cache: ModelCache, req: Request, tab: str) -> tuple[bool, object]:
    """(found, result) of a tab computed before for this request: never computes."""
    return cache.cached_view(req.key(tab) + _marks(cache, req, tab))


def compute(cache: ModelCache, req: Request, tab: str, progress=None):
    """A tab's result for `req`, from the cache or computed now (see `results` for its shape)."""
    return cache.view(req.key(tab) + _marks(cache, req, tab), lambda: _COMPUTE[tab](cache, req, progress))


def _story(cache, req, progress):
    return views.story(cache, req.model, req.config, req.image)


def _ranges(cache, req, progress):
    """(layers the dropdown offers, the layer shown, its figure)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = sc.range_layers
    layer = req.range_layer if req.range_layer in layers else views.default_range_layer(cache, sc)
    return layers, layer, views.channel_ranges(cache, sc, layer) if layer else None


def _law(cache, req, progress):
    """None where no layer has a law, else (layers the dropdown offers, the layer and channel shown,
    the histogram, the spread scatter, the summary)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = advisor.law_layers(sc)
    if not layers:
        return None
    if req.law_layer in layers:
        layer, channel = req.law_layer, req.law_channel
    else:   # another layer's channel means nothing here
        layer, channel = advisor.default_law_layer(cache, sc), None
    return (layers, layer, *advisor.law(cache, sc, layer, channel))


def _layer_error(cache, req, progress):
    raised = advisor.layers_raised(cache, req.model, req.config, req.budget)
    return views.layer_error(cache, views.scene(cache, req.model, req.config, req.image), raised, req.budget)


def _advisor(cache, req, progress):
    """(summary, ranking figure, table rows) of the advice at the session's budget."""
    return advisor.advisor(cache, req.model, req.config, req.budget, progress)


def _error_map(cache, req, progress):
    """(layers the dropdown offers, the layer shown, its figure)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    layers = ["logits", *sc.map_layers]
    layer = req.map_layer if req.map_layer in layers else "logits"
    return layers, layer, views.error_map(cache, sc, layer, req.channel if layer != "logits" else None)


def _attribution(cache, req, progress):
    return views.attribution(cache, views.scene(cache, req.model, req.config, req.image), req.attr_method)


def _attention(cache, req, progress):
    """None for a model without attention, else (last block, the block shown, maps, inversions, text)."""
    sc = views.scene(cache, req.model, req.config, req.image)
    if not views.is_transformer(sc.qmodel.model):
        return None
    last = len(sc.qmodel.model.blocks) - 1
    block = min(int(req.block), last) if req.block is not None else last
    return (last, block, *views.attention(cache, sc, block))


def _methods(cache, req, progress):
    """(figure, table rows) of every method at the applied bits."""
    fig, rows = views.methods(cache, req.model, req.config, req.image, progress)
    return fig, views.methods_table(rows)


_COMPUTE = {"story": _story, "ranges": _ranges, "law": _law, "layer-error": _layer_error, "error-map": _error_map,
            "attribution": _attribution, "attention": _attention, "methods": _methods, "advisor": _advisor}
