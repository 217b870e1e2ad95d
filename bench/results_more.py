"""The sections of docs/results.md for the three offline models, the advisor, the app under load and
the background distillation, and the README's table across models. Standard library only, like
results_doc.py, which assembles the page."""
from __future__ import annotations

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
MODEL_METHODS = ["spiq", "static-tensor (BN)", "dynamic-tensor", "dynamic-channel"]
MODEL_BITS = ["W8A8", "W8A5", "W8A4"]


def commit_of(d: dict) -> str:
    """The checkout a results file was measured at, as bench/common.py's commit() recorded it."""
    c = d["commit"]
    return f"`{c.removesuffix('-dirty')}` with uncommitted changes" if c.endswith("-dirty") else f"`{c}`"


def measured_at(*runs: dict, labels: list[str] | None = None) -> str:
    """The sentence naming the commit these results files were measured at; `labels` name each file
    where they differ."""
    by: dict[str, list[str]] = {}
    for i, d in enumerate(runs):
        by.setdefault(commit_of(d), []).append(labels[i] if labels else "")
    if len(by) == 1:
        return f"Measured at commit {next(iter(by))}."
    each = [f"{c} ({', '.join(names)})" for c, names in by.items()]
    return "Measured at commits " + ", ".join(each[:-1]) + " and " + each[-1] + "."


def _pct(x: float) -> str:
    return f"{x * 100:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _row(d: dict, method: str, bits: str) -> dict:
    return next(r for r in d["results"] if r["label"] == method and r["bits"] == bits)


def model_runs(data: dict[str, dict]) -> dict[str, dict]:
    """accuracy.json is Lite0's; accuracy_<model>.json the others'."""
    return {m: data["accuracy"] if m == LITES[0] else data[f"accuracy_{m}"] for m in LITES if
            m == LITES[0] or f"accuracy_{m}" in data}


def models_headline(data: dict[str, dict], bits: str = "W8A4") -> list[str]:
    """The README's table: agreement / logit SQNR of each method on each offline model at `bits`."""
    runs = model_runs(data)
    rows = [[f"`{m.removesuffix(' (BN)')}`"] + [f"{_pct(_row(d, m, bits)['agreement'])} % / "
                                                  f"{_row(d, m, bits)['logit_sqnr_db']:.1f} dB" for d in runs.values()]
            for m in MODEL_METHODS]
    names = [m.replace("efficientnet_", "") for m in runs]
    return _table([f"{bits}, agreement / logit SQNR"] + names, rows) + ["", measured_at(*runs.values(), labels=names)]


def models(data: dict[str, dict]) -> list:
    runs = model_runs(data)
    lines = ["## The three offline models",
             "`python bench/accuracy.py --model efficientnet_lite1` (and `lite2`) writes `accuracy_<model>.json`; "
             "Lite0's rows come from `accuracy.json`. Same protocol as above: the sample without the calibration "
             "images, defaults with the bias fit. Cells: top-1 % / agreement % / logit SQNR dB.",
             measured_at(*runs.values(), labels=[m.replace("efficientnet_", "") for m in runs]),
             _table(["model", "float top-1 %"], [[m.replace("efficientnet_", ""), _pct(d["top1_fp"])]
                                                  for m, d in runs.items()])]
    for m, d in runs.items():
        lines += [f"`{m}` ({d['n_images']} images):", _table(["method"] + MODEL_BITS, [
            [meth] + [f"{_pct(r['top1'])} / {_pct(r['agreement'])} / {r['logit_sqnr_db']:.1f}"
                      for r in (_row(d, meth, b) for b in MODEL_BITS)] for meth in MODEL_METHODS])]
    return lines


def advise(d: dict) -> list:
    rows = [[r["label"], f"{r['input_budget_used']:.3f}",
             "" if r.get("predicted_sqnr_db") is None else f"{r['predicted_sqnr_db']:.1f}", _pct(r["top1"]),
             _pct(r["agreement"]), f"{r['logit_sqnr_db']:.2f}"] for r in d["rows"]]
    diffs = [[x["a"], x["b"], f"{x['difference'] * 100:+.1f} ± {x['half_width_95'] * 100:.1f}",
              f"{x['sqnr_difference_db']:+.2f}"] for x in d["differences"]]
    real = d.get("seconds_sensitivity_real")
    return ["## Advisor: mixed precision under a budget",
            "`python bench/advise.py` writes `advise.json`, `advise.md` and the curve `docs/advise-budgets.svg`. "
            f"EfficientNet-Lite0, SPIQ, 8-bit weights; per-layer input widths from {', '.join(map(str, d['widths']))} "
            "chosen by `spiq advise` under an average-input-bits budget ([advise.md](advise.md)). Every row is scored "
            f"on {d['n_images']} held-out sample images; \"(real)\" rows drive the same search with the 32 calibration "
            "images instead of distilled ones. " + measured_at(d),
            _table(["recipe", "avg input bits", "predicted SQNR, dB", "top-1 %", "agreement %", "logit SQNR, dB"], rows),
            "Agreement difference in points, with the ~95 % interval of the paired difference, and logit SQNR "
            "difference in dB:", _table(["advised", "against", "agreement", "logit SQNR"], diffs),
            "![Agreement and logit SQNR against average input bits](advise-budgets.svg)",
            f"The sensitivity table took {d['seconds_sensitivity']:.0f} s on distilled images"
            + (f" and {real:.0f} s on the real ones" if real else "") + " (2 shared cores)."]


def _load_rows(d: dict, busy: str) -> list[list[str]]:
    t = d["targets"]
    return [[f"busy ({d['busy_sessions']} {busy}): text", f"{d['busy']['median_text_s']:.1f} "
             f"({d['busy']['worst_text_s']:.1f}) s", f"≤ {t['busy_median_text_s']:g} s"],
            ["busy: plot", f"{d['busy']['median_plot_s']:.1f} ({d['busy']['worst_plot_s']:.1f}) s",
             f"≤ {t['busy_median_plot_s']:g} s"]]


def app_load(d: dict, browser: dict | None = None) -> list:
    """`d`: the busy sessions through gradio_client; `browser`: Chromium pages on this machine."""
    t = d["targets"]
    rows = [["idle: first prediction text, median (worst) of " + str(d["pages"]), f"{d['idle']['median_text_s']:.1f} "
             f"({d['idle']['worst_text_s']:.1f}) s", ""],
            ["idle: its plot", f"{d['idle']['median_plot_s']:.1f} ({d['idle']['worst_plot_s']:.1f}) s", ""],
            *_load_rows(d, "gradio_client sessions applying recipes, every view after each"),
            ["cold start: first prediction text after the server answers", f"{d['cold_start_text_s']:.1f} s",
             f"≤ {t['cold_start_text_s']:g} s"]]
    if browser is not None:
        rows += _load_rows(browser, "Chromium pages on this machine applying recipes, Layer error open")
    return ["## The app under load", "`python bench/app_load.py` writes `app_load.json`: new pages in a real Chromium, "
            "times from navigation to the first prediction's text and plot, with the load from gradio_client "
            "sessions (visitors whose browsers run elsewhere, as on a Space); `--load browser` writes "
            "`app_load_browser.json`, the load from Chromium pages sharing this machine's 2 cores. "
            + measured_at(*([d, browser] if browser is not None else [d]), labels=["`app_load.json`", "`app_load_browser.json`"]),
            _table(["measure", "measured", "target"], rows),
            *([d["notes"]] if d.get("notes") else []), *([browser["notes"]] if browser and browser.get("notes") else [])]


def background(d: dict) -> list:
    rows = [[k, f"{r['quiet_s']:.2f}", f"{r['with_background_s']:.2f}", f"{r['slowdown'] * 100:+.0f} %"]
            for k, r in d["rows"].items()]
    load = ", ".join(f"{x:.1f}" for x in d["load_average"])
    return ["## Background distillation", "`python bench/background.py` writes `background.json`: a visitor's requests "
            "timed while a `spiq distill` child distils at nice 19 and SCHED_IDLE on one thread, as the app's "
            f"background does. Medians of {d['repeats']} requests of each kind, with the child stopped (quiet) and "
            "running in turn, so both see the same machine. " + measured_at(d),
            _table(["request", "quiet, s", "with the child distilling, s", "slowdown"], rows),
            f"Target: at most {d['target_slowdown'] * 100:.0f} % slower. Load average at the end of the run: {load}."]


def advise_headline(d: dict) -> list[str]:
    """The README's lines on the advisor: each advised budget against the uniform width it spends."""
    rows = {r["label"]: r for r in d["rows"]}
    pairs = [(f"advised {b} (distilled)", f"uniform W8A{u}") for b, u in (("4.0", 4), ("4.5", 5))]
    said = [f"at {a.split()[1]} bits {_pct(rows[a]['agreement'])} % / {rows[a]['logit_sqnr_db']:.1f} dB against "
            f"{u.split()[1]}'s {_pct(rows[u]['agreement'])} % / {rows[u]['logit_sqnr_db']:.1f} dB" for a, u in pairs
            if a in rows and u in rows]
    return ["", f"Per-layer input widths chosen by `spiq advise` from distilled images only (SPIQ, 8-bit weights, "
                f"{d['n_images']} held-out images): {'; '.join(said)} ([docs/advise.md](docs/advise.md); measured at "
                f"commit {commit_of(d)}).", "",
            "![Agreement and logit SQNR against average input bits, advised and uniform](docs/advise-budgets.svg)"]


def app_load_headline(d: dict) -> list[str]:
    """The README's line on how long a new visitor waits, against the targets."""
    t = d["targets"]
    return ["", f"A new visitor of the app sees the first prediction {d['idle']['median_text_s']:.1f} s after opening "
                f"the page on an idle server, {d['busy']['median_text_s']:.1f} s (its plot "
                f"{d['busy']['median_plot_s']:.1f} s) while three other sessions keep applying recipes (targets "
                f"{t['busy_median_text_s']:g} s and {t['busy_median_plot_s']:g} s), and {d['cold_start_text_s']:.1f} s "
                f"after a cold start (target {t['cold_start_text_s']:g} s) "
                f"([docs/app.md](docs/app.md#latency), `bench/results/app_load.json`, measured at commit {commit_of(d)})."]
