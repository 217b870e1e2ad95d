"""What a new page opens on: the shipped examples, the default model and recipe, the predictions
laid into the page itself, and links to a state (query parameters `recipe` and `example`)."""
from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlencode

from spiq.config import ConfigError, QuantConfig
from spiq.models.data import open_image
from spiq.quantize.api import check_config
from spiq.ui import views
from spiq.ui.cache import ModelCache

# The example photos beside the package (app.py runs from the repository).
ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_MODEL = "efficientnet_lite0"
# In the order bench/order_examples.py chose: first the one that shows SPIQ's point at first sight.
EXAMPLES = [str(ASSETS / f) for f in (ASSETS / "examples.txt").read_text().split()]
# A link's recipe: a URL longer than this is not one anyone shares (a recipe file is up to 1 MB).
MAX_LINK_RECIPE = 8192


def example_names() -> dict[str, str]:
    """File name -> path of each shipped example."""
    return {Path(e).name: e for e in EXAMPLES}


@functools.lru_cache(maxsize=1)
def _example_digests() -> dict[str, str]:
    """Pixel digest -> file name of each shipped example: which example an image is, however it came."""
    return {views.image_digest(open_image(Path(path))): name for name, path in example_names().items()}


def link_query(config: QuantConfig, image) -> str:
    """The query string of a link to this state: the applied recipe and, if the image is a shipped
    example, its file name (an uploaded image cannot travel in a link)."""
    params = {"recipe": config.to_json()}
    if image is not None and (name := _example_digests().get(views.image_digest(image))) is not None:
        params["example"] = name
    return "?" + urlencode(params)


def link_state(cache: ModelCache, query: dict, model_name: str) -> tuple[QuantConfig | None, str | None]:
    """The recipe and the example's path a link's query names, each checked as an upload is
    (ConfigError, or the model's own errors, when it is not one this app can show)."""
    config = None
    if (text := query.get("recipe")) is not None:
        if len(text) > MAX_LINK_RECIPE:
            raise ConfigError(f"the link's recipe has {len(text)} characters; at most {MAX_LINK_RECIPE}")
        config = QuantConfig.from_json(text)
        check_config(cache.load(model_name).model, config)
    example = query.get("example")
    if example is not None and example not in example_names():
        raise ConfigError(f"the link names no shipped example {example[:40]!r}; the examples are "
                          f"{', '.join(example_names())}")
    return config, None if example is None else example_names()[example]


def first_predictions(cache: ModelCache) -> tuple:
    """The default page's prediction figure and line (default model and recipe, first example).

    Computed once at start and written into the page itself, so a new visitor sees them as soon as
    the page is drawn, before and without any request; a link's page replaces them with its own."""
    if not EXAMPLES:
        return None, None
    sc = views.scene(cache, DEFAULT_MODEL, QuantConfig(), open_image(Path(EXAMPLES[0])))
    return views.predictions(cache, sc)
