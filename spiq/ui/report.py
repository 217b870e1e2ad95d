"""A recipe's report: one HTML file with the recipe, its accuracy on a folder and the app's views of
a few of its images, for a paper review or a talk without the app running.

The views are those of the app (`spiq.ui.views`), computed through a `ModelCache` that holds the
very model the accuracy was measured on, so the figures and the numbers describe one model. The
file opens offline: plotly's bundle is inlined once, the predictions are PNG images.
"""
from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import plotly.graph_objects as go
import torch
from matplotlib.figure import Figure

from spiq.analysis.evaluate import EvalResult
from spiq.analysis.layers import fold_cost
from spiq.analysis.sweep_report import embed_figures
from spiq.config import QuantConfig
from spiq.models.data import open_image
from spiq.ui import plots, views
from spiq.ui.cache import ModelCache


@dataclass
class ImageViews:
    """The app's views of one image: its file name, the predictions' one-line verdict, the figures,
    and whether the folder's evaluation flipped its top-1 (batched, a near-tie can go either way)."""
    name: str
    verdict: str
    figures: list[tuple[str, go.Figure | Figure]] = field(default_factory=list)
    flipped: bool = False


def pick_images(paths: list[Path], fp_pred: torch.Tensor, q_pred: torch.Tensor, k: int) -> list[tuple[Path, bool]]:
    """k images to show, each with whether its top-1 flipped: the flipped ones first (what a reviewer
    asks about), then the others, each group in folder order."""
    marked = [(p, f != q) for p, f, q in zip(paths, fp_pred.tolist(), q_pred.tolist())]
    return ([m for m in marked if m[1]] + [m for m in marked if not m[1]])[:k]


def image_views(cache: ModelCache, model: str, config: QuantConfig, path: Path, flipped: bool = False) -> ImageViews:
    """Predictions, channel ranges, layer error, error map, attribution (and attention for a
    transformer) of one image, as the app's tabs show them at their defaults."""
    sc = views.scene(cache, model, config, open_image(path))
    pred, verdict = views.predictions(cache, sc)
    figs = [("Predictions", pred)]
    if (layer := views.default_range_layer(cache, sc)) is not None:
        figs.append(("Channel ranges", views.channel_ranges(cache, sc, layer)))
    sqnr, breakdown, _, _ = views.layer_error(cache, sc)
    figs += [("Layer error", sqnr), ("Layer error by source", breakdown),
             ("Error map", views.error_map(cache, sc, "logits")), ("Attribution", views.attribution(cache, sc))]
    if views.is_transformer(sc.loaded.model):
        attention, inversions, _ = views.attention(cache, sc)
        figs += [("Attention", attention), ("Attention rank inversions", inversions)]
    return ImageViews(path.name, verdict, figs, flipped)


def fold_figure(cache: ModelCache, model: str, config: QuantConfig) -> go.Figure | None:
    """The fold cost of the recipe's per-channel layers: one figure for the recipe, not per image
    (the Layer error tab's third figure, from the same cached rows)."""
    loaded, q = cache.load(model), cache.quantized(model, config)
    with cache.lock:
        rows = cache.derived(model, config, "fold_cost", lambda: fold_cost(loaded.model, q, cache.memo(model)))
    return plots.fold_cost(rows) if rows else None


def collect_views(cache: ModelCache, model: str, config: QuantConfig, picked: list[tuple[Path, bool]],
                  progress: Callable[[int], None] | None = None) -> list[ImageViews]:
    """`picked`: (image, whether the evaluation flipped it), as pick_images gives them."""
    out = []
    for path, flipped in picked:
        out.append(image_views(cache, model, config, path, flipped))
        if progress is not None:
            progress(1)
    return out


def _markdown(text: str) -> str:
    """The views' one-line verdicts use **bold** only."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _accuracy_table(result: EvalResult, folder: str, skipped: int) -> str:
    sqnr = "" if result.logit_sqnr_db is None else f"{result.logit_sqnr_db:.2f} dB"
    rows = [("images", f"{result.n_images} from {folder}" + (f" ({skipped} unreadable, left out)" if skipped else "")),
            ("top-1, float", f"{result.top1_fp * 100:.2f} %"), ("top-1, quantized", f"{result.top1 * 100:.2f} %"),
            ("agreement with the float top-1", f"{result.agreement * 100:.2f} %"),
            ("mean logit SQNR against the float model", sqnr)]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="accuracy">{cells}</table>'


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
         "table.accuracy th{text-align:left;padding-right:2em}pre{background:#f4f4f4;padding:1em;overflow:auto}")


def _still(fig: Figure) -> str:
    """A matplotlib figure (the predictions) as an inline PNG: the file stays self-contained."""
    with io.BytesIO() as buf:
        fig.savefig(buf, format="png")
        data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _embed(figs: list) -> list[str]:
    """Each figure as HTML: plotly ones interactive (the bundle inlined once), matplotlib ones as images."""
    interactive = iter(embed_figures([f for f in figs if isinstance(f, go.Figure)]))
    return [next(interactive) if isinstance(f, go.Figure) else _still(f) for f in figs]


def report_html(model: str, config: QuantConfig, result: EvalResult, folder: str, shown: list[ImageViews],
                fold: go.Figure | None = None, skipped: int = 0) -> str:
    """The whole report: the recipe, its accuracy, the fold cost, then each image's views."""
    figs = ([fold] if fold is not None else []) + [f for iv in shown for _, f in iv.figures]
    parts = iter(_embed(figs))
    title = f"{model} {config.method} W{config.weight_bits}A{config.input_bits}"
    body = [f"<h1>spiq report: {html.escape(title)}</h1>",
            f"<p>Made on {time.strftime('%Y-%m-%d %H:%M')} by <code>spiq report</code>.</p>",
            "<h2>Recipe</h2>", f'<pre class="recipe">{html.escape(config.to_json(indent=2))}</pre>',
            "<h2>Accuracy</h2>", _accuracy_table(result, folder, skipped)]
    if fold is not None:
        body += ["<h2>Fold cost</h2>", next(parts)]
    body.append(f"<h2>Views of {len(shown)} images</h2><p>Images whose top-1 the recipe flips come first, "
                "then the others in folder order; each view is the app's tab of that name.</p>")
    for iv in shown:
        mark = " (top-1 flipped in the evaluation)" if iv.flipped else ""
        body += [f"<h3>{html.escape(iv.name + mark)}</h3>", f"<p>{_markdown(iv.verdict)}</p>"]
        for name, _ in iv.figures:
            body += [f"<h4>{html.escape(name)}</h4>", next(parts)]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>spiq report: {html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
