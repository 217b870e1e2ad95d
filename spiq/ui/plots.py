"""Every figure of the project, built in one place with plotly (renders in Jupyter with fig.show()),
but for the top-5 predictions, a matplotlib still (see `predictions`)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from spiq.analysis.law import histogram_edges, law_counts

FLOAT, QUANT, TENSOR, BAD, GOOD = "#4c78a8", "#f58518", "#9d9d9d", "#e45756", "#54a24b"


def layer_sqnr(rows, worst: int = 5, raised: dict[str, int] | None = None, budget: float | None = None) -> go.Figure:
    """Isolated and propagated output SQNR per layer; the `worst` isolated layers highlighted, and
    `raised` ({layer: bits}, the advisor's layers above the budget) marked with their width."""
    names = [r.name for r in rows]
    iso = [r.isolated for r in rows]
    bad = set(np.argsort(iso)[:worst].tolist())
    fig = go.Figure([
        go.Bar(x=names, y=iso, name="isolated", marker_color=[BAD if i in bad else QUANT for i in range(len(rows))]),
        go.Scatter(x=names, y=[r.propagated for r in rows], name="propagated", mode="lines+markers",
                   line_color=FLOAT),
    ])
    if raised:
        iso_of = dict(zip(names, iso))
        marked = [n for n in names if n in raised]
        fig.add_scatter(x=marked, y=[iso_of[n] for n in marked], mode="markers+text", name=f"advisor raises "
                        f"(budget {budget:g} bits)", text=[f"A{raised[n]}" for n in marked], textposition="top center",
                        marker=dict(symbol="star", size=13, color=GOOD, line=dict(width=1, color="black")))
    fig.update_layout(title="Output SQNR per layer (higher is better)", yaxis_title="dB", xaxis_tickangle=-60,
                      legend_orientation="h")
    return fig


def channel_ranges(cr, max_channels: int = 96, caption: str = "") -> go.Figure:
    """Per-channel ranges (bars) against the one per-tensor range (band) and what the image used;
    below, the bits each channel's values use on its own grid and on the shared one, and the
    share of its values its own range clips. `caption`: a line under the title."""
    order = np.argsort(-cr.data_free_hi.numpy())[:max_channels]
    ch = [str(int(c)) for c in order]
    lo, hi = cr.data_free_lo.numpy()[order], cr.data_free_hi.numpy()[order]
    hover = np.stack([cr.step.numpy()[order], 100 * cr.clipped.numpy()[order]], 1)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.06)
    fig.add_bar(x=ch, y=hi - lo, base=lo, name=f"per-channel range ({cr.bits} bits each)", marker_color=QUANT,
                opacity=0.6, customdata=hover, row=1, col=1,
                hovertemplate="channel %{x}<br>range %{base:.3g} to %{y:.3g} wide<br>step %{customdata[0]:.3g}"
                              "<br>clipped %{customdata[1]:.2f} %<extra></extra>")
    for y, show in ((cr.observed_hi, True), (cr.observed_lo, False)):
        fig.add_scatter(x=ch, y=y.numpy()[order], mode="markers", name="observed min / max", showlegend=show,
                        marker=dict(color=FLOAT, symbol="line-ew-open", size=12), row=1, col=1)
    fig.add_scatter(x=ch, y=cr.effective_bits.numpy()[order], mode="lines+markers", name="bits used, own grid",
                    line_color=QUANT, row=2, col=1)
    fig.add_scatter(x=ch, y=cr.effective_bits_tensor.numpy()[order], mode="lines+markers",
                    name="bits used, per-tensor grid", line_color=TENSOR, row=2, col=1)
    fig.add_bar(x=ch, y=100 * cr.clipped.numpy()[order], name="% of values clipped (own range)",
                marker_color=BAD, opacity=0.5, row=2, col=1)
    fig.add_hrect(y0=cr.tensor_lo, y1=cr.tensor_hi, fillcolor=TENSOR, opacity=0.15, line_width=0, row=1, col=1,
                  annotation_text=f"per-tensor range, step {cr.tensor_step:.3g}")
    eb_c, eb_t = float(cr.effective_bits.mean()), float(cr.effective_bits_tensor.mean())
    title = f"{cr.layer}: input ranges — mean bits used {eb_c:.2f} per channel vs {eb_t:.2f} per tensor"
    fig.update_layout(title=title + (f"<br><sup>{caption}</sup>" if caption else ""), barmode="overlay",
                      legend_orientation="h", height=560)
    fig.update_yaxes(title_text="value", row=1, col=1)
    fig.update_yaxes(title_text="bits used / % clipped", row=2, col=1)
    fig.update_xaxes(title_text="input channel (widest first)", row=2, col=1)
    return fig


def layer_breakdown(rows) -> go.Figure:
    """Where each layer loses: input clipping, input rounding + clipping, weights."""
    names = [r.name for r in rows]
    fig = go.Figure([go.Scatter(x=names, y=[getattr(r, k) for r in rows], name=label, mode="lines+markers")
                     for k, label in (("clip", "input clipping only"), ("input", "input quantized"),
                                      ("weight", "weights only"), ("both", "layer quantized"))])
    fig.update_layout(title="Output SQNR per error source, each layer isolated", yaxis_title="dB",
                      xaxis_tickangle=-60, legend_orientation="h")
    return fig


def fold_cost(rows) -> go.Figure:
    names = [r.name for r in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=(
        "weight SQNR lost by folding the input scales (dB)", "input SQNR gained per channel (dB)"))
    fig.add_bar(x=names, y=[r.weight_sqnr - r.weight_sqnr_folded for r in rows], marker_color=BAD, row=1, col=1,
                name="weight cost")
    fig.add_bar(x=names, y=[r.input_sqnr_channel - r.input_sqnr_tensor for r in rows], marker_color=QUANT,
                row=2, col=1, name="input gain")
    fig.update_layout(showlegend=False, xaxis2_tickangle=-60, title="Fold cost against input error removed")
    return fig


def _image_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


# Map cells per side sent to the browser. A 224-pixel map pooled 2x2 looks the same on screen and
# is a quarter of the figure's bytes: every view of an image crosses the network on each refresh.
_MAX_MAP_CELLS = 112


def _jpeg_uri(image) -> str:
    """The image as a JPEG data URI: about a tenth of the bytes of its pixel array in plotly's JSON."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image_array(image)).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(m, image, **heatmap) -> go.Heatmap:
    """A map (h, w) laid over the pixels of `image` (H, W), pooled to at most _MAX_MAP_CELLS a side.

    Image pixel i sits at x = i, so a cell covering pixels [j·W/w, (j+1)·W/w) is centred at
    (j + 0.5)·W/w − 0.5.
    """
    import torch
    from torch.nn import functional as F

    m = torch.as_tensor(m, dtype=torch.float32)
    if max(m.shape) > _MAX_MAP_CELLS:
        m = F.adaptive_avg_pool2d(m[None, None], [min(n, _MAX_MAP_CELLS) for n in m.shape])[0, 0]
    (h, w), (big_h, big_w) = m.shape, _image_array(image).shape[:2]
    dx, dy = big_w / w, big_h / h
    return go.Heatmap(z=m.numpy(), x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy, **heatmap)


def error_map(image, emap, title: str = "quantization error") -> go.Figure:
    """The error map (H, W) over the image it was computed for."""
    fig = go.Figure([go.Image(source=_jpeg_uri(image)),
                     _overlay(emap, image, colorscale="Inferno", opacity=0.55, colorbar_title="|y − ŷ|")])
    fig.update_layout(title=title, yaxis_autorange="reversed", xaxis_visible=False, yaxis_visible=False)
    return fig


def attribution(image, drift) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "float", "quantized", f"difference (rank corr. {drift.rank_correlation:.2f})"))
    picture = _jpeg_uri(image)   # encoded once, shown under every panel
    for col, (m, scale) in enumerate(((drift.float_map, "Viridis"), (drift.quant_map, "Viridis"),
                                      (drift.difference, "RdBu")), 1):
        fig.add_trace(go.Image(source=picture, opacity=0.35), row=1, col=col)
        fig.add_trace(_overlay(m, image, colorscale=scale, opacity=0.7, showscale=col == 3,
                               zmid=0 if col == 3 else None), row=1, col=col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(title=f"Attribution ({drift.method}) of class {drift.target}")
    return fig


def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[:width - 1] + "…"


def predictions(cmp) -> Figure:
    """Float above quantized, compact: the figure sits beside the recipe and the image at 1280x720.

    The one figure drawn with matplotlib, as a still image: the page shows it as soon as it is
    drawn, where a plotly figure would first wait for plotly's 4.4 MB script to load and compile."""
    fig = Figure(figsize=(4.6, 4.3), dpi=100)
    # no figure title: the plot's label ("Top-5, float vs quantized") covers the image's top left
    fig.subplots_adjust(left=0.37, right=0.97, top=0.9, bottom=0.11, hspace=0.35)
    axes = fig.subplots(2, 1, sharex=True)
    quant_title = f"quantized, logit SQNR {cmp.logit_sqnr:.1f} dB" + (" — top-1 flipped" if cmp.flipped else "")
    for ax, (p, color, title) in zip(axes, ((cmp.float, FLOAT, "float"),
                                            (cmp.quant, BAD if cmp.flipped else QUANT, quant_title))):
        bars = ax.barh(range(len(p.probs)), p.probs[::-1], color=color)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in p.probs[::-1]], padding=2, fontsize=8)
        ax.set_yticks(range(len(p.probs)), labels=[_short(c) for c in p.classes[::-1]], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1.12)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xlabel("probability", fontsize=9)
    return fig


def methods(rows, float_top1: str, config) -> go.Figure:
    """Every method at the same bits on one image: logit SQNR, green where top-1 matches the float model."""
    fig = go.Figure(go.Bar(
        x=[r["method"] for r in rows], y=[r["logit_sqnr"] for r in rows],
        marker_color=[GOOD if r["agrees"] else BAD for r in rows],
        text=[f'{r["top1"]} ({r["prob"]:.0%})' for r in rows], textposition="outside", cliponaxis=False))
    fig.update_layout(title=f"All methods at W{config.weight_bits}A{config.input_bits} on this image "
                            f"(float top-1: {float_top1}; red: top-1 flipped)",
                      yaxis_title="logit SQNR (dB, higher is better)", showlegend=False)
    return fig


def story(picture, panels, config) -> go.Figure:
    """Float vs SPIQ vs per-tensor on one screen: where the logit error sits, and the top-5 of each.

    `panels`: [(method, Comparison, logit error map)] for SPIQ and per-tensor static.
    """
    names = {"spiq": "SPIQ (per-channel, data-free)", "static-tensor": "per-tensor static (BN)"}
    titles = ["float: what the model sees"] + [
        f"{names.get(m, m)}: {c.logit_sqnr:.1f} dB" + (" — FLIPPED" if c.flipped else "") for m, c, _ in panels]
    fig = make_subplots(rows=2, cols=3, subplot_titles=titles + ["float top-5"] + [f"{names.get(m, m)} top-5"
                                                                                 for m, _, _ in panels],
                        vertical_spacing=0.12, horizontal_spacing=0.08, row_heights=[0.6, 0.4])
    uri = _jpeg_uri(picture)   # encoded once, shown under every panel
    fig.add_trace(go.Image(source=uri), row=1, col=1)
    zmax = max(float(e.max()) for _, _, e in panels) or 1.0
    for col, (_, _, emap) in enumerate(panels, 2):
        fig.add_trace(go.Image(source=uri, opacity=0.5), row=1, col=col)
        fig.add_trace(_overlay(emap, picture, colorscale="Inferno", zmin=0, zmax=zmax, opacity=0.6,
                               showscale=col == 3, colorbar=dict(title="logit error", len=0.55, y=0.75)),
                      row=1, col=col)
    bars = [(panels[0][1].float, FLOAT)] + [(c.quant, BAD if c.flipped else QUANT) for _, c, _ in panels]
    for col, (p, color) in enumerate(bars, 1):
        fig.add_trace(go.Bar(x=p.probs[::-1], y=p.classes[::-1], orientation="h", marker_color=color), row=2, col=col)
        fig.update_xaxes(range=[0, 1], row=2, col=col)
    for col in (1, 2, 3):
        fig.update_xaxes(visible=False, row=1, col=col)
        fig.update_yaxes(visible=False, autorange="reversed", row=1, col=col)
    fig.update_layout(title=f"W{config.weight_bits}A{config.input_bits}: float vs SPIQ vs per-tensor on this image",
                      showlegend=False, height=640)
    return fig


def deploy_latency(rows, cpu: str) -> go.Figure:
    """Measured batch-1 latency of each runtime variant, SPIQ int8 highlighted."""
    fig = go.Figure(go.Bar(
        x=[r["variant"] for r in rows], y=[r["ms"] for r in rows],
        error_y={"type": "data", "symmetric": False, "array": [r["p90"] - r["ms"] for r in rows],
                 "arrayminus": [r["ms"] - r["p10"] for r in rows]},
        marker_color=[QUANT if r["variant"].startswith("SPIQ") else TENSOR for r in rows],
        text=[f'{r["ms"]:.2f} ms' for r in rows], textposition="outside", cliponaxis=False))
    fig.update_layout(title=f"Batch-1 latency, ONNX Runtime, median and p10–p90 ({cpu})", yaxis_title="ms",
                      showlegend=False)
    return fig


def deploy_parity(rows) -> go.Figure:
    """Per int8 layer: how close ONNX Runtime's quantized input is to the simulation's (SQNR)."""
    names = [r["layer"] for r in rows]
    fig = go.Figure(go.Bar(
        x=names, y=[min(r["sqnr_db"], 200.0) for r in rows],
        marker_color=[BAD if r["requantized"] or r["mul"] else QUANT for r in rows],
        hovertext=["re-quantized for the shared residual-stream grid" if r["requantized"] else
                   "explicit per-channel Mul" if r["mul"] else "exact fold" for r in rows]))
    fig.update_layout(title="Real int8 vs simulation: SQNR of each layer's quantized input (red: re-quantized)",
                      yaxis_title="dB", xaxis_tickangle=-60)
    return fig


def attention(image, am) -> go.Figure:
    """Per head, where the class token looks: float (top row) vs quantized (bottom), over the image."""

    heads = am.float_maps.shape[0]
    picture = _jpeg_uri(image)   # encoded once, shown under every head's map
    fig = make_subplots(rows=2, cols=heads, horizontal_spacing=0.01, vertical_spacing=0.06,
                        subplot_titles=[f"head {i}" for i in range(heads)] + [""] * heads)
    top = float(max(am.float_maps.max(), am.quant_maps.max()))
    for row, maps in enumerate((am.float_maps, am.quant_maps), 1):
        for col in range(heads):
            fig.add_trace(go.Image(source=picture, opacity=0.4), row=row, col=col + 1)
            fig.add_trace(_overlay(maps[col], image, colorscale="Viridis", opacity=0.75, zmin=0, zmax=top,
                                   showscale=row == 1 and col == heads - 1, colorbar_title="attention"),
                          row=row, col=col + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_yaxes(visible=True, showticklabels=False, title_text="float", row=1, col=1)
    fig.update_yaxes(visible=True, showticklabels=False, title_text="quantized", row=2, col=1)
    fig.update_layout(title=f"Block {am.block}: the class token's attention to each patch, per head",
                      height=260 + 40 * min(heads, 6))
    return fig


def rank_inversions(am) -> go.Figure:
    """Share of compared key pairs whose attention-score order the quantized model reverses, per block."""
    blocks = [str(i) for i in range(len(am.inversions))]
    share = [100.0 * r / max(n, 1) for r, n in am.inversions]
    colours = [BAD if i == am.block else QUANT for i in range(len(blocks))]
    fig = go.Figure(go.Bar(x=blocks, y=share, marker_color=colours,
                           text=[f"{r:,}" for r, _ in am.inversions], textposition="outside"))
    fig.update_layout(title=f"Attention rank inversions per block ({am.pairs_per_row} random key pairs per query row)",
                      xaxis_title="block", yaxis_title="% of pairs reversed")
    return fig


WIDTH_COLORS = {2: "#b279a2", 3: "#b279a2", 4: BAD, 5: QUANT, 6: "#eeca3b", 7: "#72b7b2", 8: GOOD}


def sensitivity_ranking(table, widths: dict[str, int], low: int, budget: float) -> go.Figure:
    """The advisor's layers, most sensitive input first: the logit SQNR with only that layer's
    input at `low` bits (bars, coloured by the advised width), its weights alone at `low` bits,
    and its share of the model's input values (right axis): what a bit there costs."""
    names = [r.name for r in table]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for b in sorted(set(widths.values())):
        picked = [r for r in table if widths[r.name] == b]
        fig.add_bar(x=[r.name for r in picked], y=[r.input_sqnr[low] for r in picked], name=f"advised: {b} bits",
                    marker_color=WIDTH_COLORS.get(b, FLOAT), secondary_y=False,
                    hovertemplate="%{x}<br>input alone at " + str(low) + " bits: %{y:.1f} dB<extra></extra>")
    fig.add_scatter(x=names, y=[r.weight_sqnr[low] for r in table], mode="markers", name=f"weights alone at {low} bits",
                    marker=dict(color=TENSOR, symbol="line-ew-open", size=10), secondary_y=False)
    fig.add_scatter(x=names, y=[100 * r.input_share for r in table], mode="lines+markers", name="input values (%)",
                    line=dict(color=FLOAT, width=1), marker_size=4, secondary_y=True)
    fig.update_layout(title=f"Data-free sensitivity: logit SQNR with one layer at {low}-bit inputs (lower: more "
                            f"sensitive), and the widths advised at {budget:g} bits on average",
                      legend_orientation="h", height=520, xaxis_tickangle=-60, barmode="overlay")
    fig.update_xaxes(categoryorder="array", categoryarray=names)
    fig.update_yaxes(title_text="logit SQNR (dB)", secondary_y=False)
    fig.update_yaxes(title_text="share of input values (%)", type="log", secondary_y=True, showgrid=False)
    return fig


def law_vs_reality(lv) -> tuple[go.Figure, go.Figure]:
    """One channel's values on the image (histogram) under the law SPIQ predicted for it (its
    expected counts per bin), SPIQ's range and the per-tensor range; and every channel's predicted
    against observed spread."""
    edges = histogram_edges(lv)
    counts, _ = np.histogram(lv.observed.numpy(), edges)
    expected = law_counts(lv, edges)
    mid = (edges[:-1] + edges[1:]) / 2
    hist = go.Figure([go.Bar(x=mid, y=counts, width=np.diff(edges), name="values on this image", marker_color=FLOAT,
                             opacity=0.7),
                      go.Scatter(x=mid, y=expected, mode="lines", name="the law SPIQ predicted (expected counts)",
                                 line=dict(color=QUANT, width=2))])
    (s_lo, s_hi), (t_lo, t_hi) = lv.spiq_range, lv.tensor_range
    for x, color, dash, label in ((s_lo, QUANT, "dash", "SPIQ"), (s_hi, QUANT, "dash", "SPIQ"),
                                  (t_lo, TENSOR, "dot", "per tensor"), (t_hi, TENSOR, "dot", "per tensor")):
        hist.add_vline(x=x, line=dict(color=color, dash=dash, width=2), annotation_text=label,
                       annotation_position="top")
    top = max(float(counts.max()), float(expected.max()), 1.0)
    span = [min(edges[0], t_lo), max(edges[-1], t_hi)]
    pad = 0.03 * (span[1] - span[0])
    hist.update_layout(
        # two short lines: the figure shares the width with the spread scatter (half of 1280 px)
        title=f"{lv.layer}, input channel {lv.channel} ({lv.bits} bits)<br><sup>clipped {100 * lv.clipped_spiq:.2f} % "
              f"by SPIQ [{s_lo:.3g}, {s_hi:.3g}], {100 * lv.clipped_tensor:.2f} % per tensor "
              f"[{t_lo:.3g}, {t_hi:.3g}]</sup>", legend_orientation="h", bargap=0, height=460)
    hist.update_xaxes(title_text="input value", range=[span[0] - pad, span[1] + pad])
    hist.update_yaxes(title_text="values per bin (log)", type="log", range=[np.log10(0.5), np.log10(top * 2)])
    return hist, _spread_scatter(lv)


def _spread_scatter(lv) -> go.Figure:
    """Predicted against observed standard deviation, one point per input channel, on log axes."""
    floor = 1e-3   # dead channels (std 0) on a log axis
    pred = lv.predicted_std.clamp_min(floor).numpy()
    obs = lv.observed_std.clamp_min(floor).numpy()
    c = lv.channel
    both = np.concatenate([pred, obs])
    line = [float(both.min()), float(both.max())]
    fig = go.Figure([
        go.Scatter(x=pred, y=obs, mode="markers", name="input channels", marker=dict(color=FLOAT, size=6, opacity=0.7),
                   customdata=np.arange(len(pred)), hovertemplate="channel %{customdata}<br>predicted std %{x:.3g}"
                                                                  "<br>observed std %{y:.3g}<extra></extra>"),
        go.Scatter(x=line, y=line, mode="lines", name="observed = predicted", line=dict(color=TENSOR, dash="dash")),
        go.Scatter(x=[pred[c]], y=[obs[c]], mode="markers", name=f"channel {c}",
                   marker=dict(color=QUANT, size=14, symbol="star", line=dict(width=1, color="black")))])
    fig.update_layout(title=f"{lv.layer}: each input channel's spread<br><sup>the law against this image (below the "
                            "line: the law is wider)</sup>", legend_orientation="h", height=460)
    fig.update_xaxes(title_text="predicted std (BatchNorm law)", type="log")
    fig.update_yaxes(title_text="observed std (this image)", type="log")
    return fig
