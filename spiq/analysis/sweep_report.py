"""A sweep's HTML report: agreement, top-1 and logit SQNR against input bits per method, one figure
per weight width and metric, and the Pareto front of input bits against agreement. One file with
plotly inlined, so it opens offline."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

from spiq.analysis.sweep import atomic_save, mark_pareto

METRICS = {"agreement": ("agreement with the float top-1 (%)", 100.0),
           "top1": ("top-1 (%)", 100.0),
           "logit_sqnr_db": ("logit SQNR (dB)", 1.0)}


def _label(record: dict, models: int) -> str:
    return record["method"] if models == 1 else f"{record['model']} {record['method']}"


def metric_figure(records: list[dict], wbits: int, metric: str) -> go.Figure:
    """One panel: `metric` against input bits at `wbits`, one line per (model,) method."""
    title, scale = METRICS[metric]
    rows = [r for r in records if r["wbits"] == wbits]
    models = len({r["model"] for r in records})
    fig = go.Figure()
    for label in dict.fromkeys(_label(r, models) for r in rows):
        line = sorted((r for r in rows if _label(r, models) == label), key=lambda r: r["abits"])
        fig.add_trace(go.Scatter(x=[r["abits"] for r in line], y=[r[metric] * scale for r in line],
                                 mode="lines+markers", name=label))
    if metric == "top1":   # where the quantized models start from
        for model in sorted({r["model"] for r in rows}):
            fp = next(r["top1_fp"] for r in rows if r["model"] == model)
            fig.add_hline(y=fp * 100, line_dash="dot", annotation_text=f"{model} float")
    fig.update_layout(title=f"W{wbits}: {title}", xaxis_title="input bits", yaxis_title=title, height=380,
                      margin=dict(l=60, r=20, t=50, b=50))
    fig.update_xaxes(dtick=1)
    return fig


def pareto_figure(records: list[dict]) -> go.Figure:
    """Every cell at (input bits, agreement), and each model's front: no cell does better with as few bits."""
    marked = mark_pareto(records)
    models = len({r["model"] for r in records})
    fig = go.Figure()
    for w in sorted({r["wbits"] for r in marked}, reverse=True):
        rows = [r for r in marked if r["wbits"] == w]
        fig.add_trace(go.Scatter(
            x=[r["abits"] for r in rows], y=[r["agreement"] * 100 for r in rows], mode="markers", name=f"W{w}",
            text=[f"{_label(r, models)} W{r['wbits']}A{r['abits']}" for r in rows], hoverinfo="text+y"))
    for model in sorted({r["model"] for r in marked}):
        front = sorted((r for r in marked if r["model"] == model and r["pareto"]), key=lambda r: r["abits"])
        fig.add_trace(go.Scatter(
            x=[r["abits"] for r in front], y=[r["agreement"] * 100 for r in front], mode="lines+markers",
            name=f"{model} Pareto front", marker=dict(symbol="star", size=12), line=dict(dash="dash"),
            text=[f"{r['method']} W{r['wbits']}A{r['abits']}" for r in front], hoverinfo="text+y"))
    fig.update_layout(title="Pareto front: mean input bits against agreement", xaxis_title="mean input bits",
                      yaxis_title="agreement (%)", height=420, margin=dict(l=60, r=20, t=50, b=50))
    fig.update_xaxes(dtick=1)
    return fig


def report_figures(records: list[dict]) -> list[go.Figure]:
    """The panels, widest weights first, then the Pareto figure."""
    figs = [metric_figure(records, w, m) for w in sorted({r["wbits"] for r in records}, reverse=True)
            for m in METRICS]
    return figs + [pareto_figure(records)] if records else []


def embed_figures(figs: list[go.Figure]) -> list[str]:
    """Each figure as an HTML fragment, the plotly bundle inlined once, in the first: the file
    must open without the network, and one bundle is 4.6 MB."""
    return [fig.to_html(include_plotlyjs=i == 0, full_html=False) for i, fig in enumerate(figs)]


def report_html(records: list[dict]) -> str:
    parts = embed_figures(report_figures(records))
    n = sorted({r["n_images"] for r in records})
    head = (f"{len(records)} cells on {', '.join(map(str, n))} images; models: "
            f"{', '.join(sorted({r['model'] for r in records}))}") if records else "no cells yet"
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>spiq sweep</title></head>\n"
            f"<body style=\"font-family: sans-serif\"><h1>spiq sweep</h1><p>{html.escape(head)}</p>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(records: list[dict], path: Path) -> None:
    text = report_html(records)
    atomic_save(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
