"""The sections of docs/results.md for real int8 and ONNX Runtime's quantizer, the three offline models,
the advisor, the app under load and the background distillation, and the README's table across
models. Standard library only, like results_doc.py, which assembles the page."""
from __future__ import annotations

from bench.results_format import and_join, commit_of, measured_at, pct, ran_on, same_kernels, shown, table

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
MODEL_METHODS = ["spiq", "static-tensor (BN)", "dynamic-tensor", "dynamic-channel"]
MODEL_BITS = ["W8A8", "W8A5", "W8A4"]
INT8_TARGETS = {f"latency_vs_{k}_b{b}": f"SPIQ int8 latency, batch {b}, × {v}" for b in (1, 16)
                for k, v in (("static", "ORT static int8"), ("fp32", "ORT FP32"))} | {
                "top1_vs_static": "SPIQ int8 top-1 minus ORT static int8's",
                "parity_agreement": "top-1 agreement with the config's simulation",
                "parity_agreement_int8_graph": "top-1 agreement with the `int8_graph` simulation"}


def _row(d: dict, method: str, bits: str) -> dict:
    return next(r for r in d["results"] if r["label"] == method and r["bits"] == bits)


def model_runs(data: dict[str, dict]) -> dict[str, dict]:
    """accuracy.json is Lite0's; accuracy_<model>.json the others'."""
    return {m: data["accuracy"] if m == LITES[0] else data[f"accuracy_{m}"] for m in LITES if
            m == LITES[0] or f"accuracy_{m}" in data}


def models_headline(data: dict[str, dict], bits: str = "W8A4") -> list[str]:
    """The README's table: agreement / logit SQNR of each method on each offline model at `bits`."""
    runs = model_runs(data)
    rows = [[f"`{m.removesuffix(' (BN)')}`"] + [f"{pct(_row(d, m, bits)['agreement'])} % / "
                                                  f"{_row(d, m, bits)['logit_sqnr_db']:.1f} dB" for d in runs.values()]
            for m in MODEL_METHODS]
    names = [m.replace("efficientnet_", "") for m in runs]
    return table([f"{bits}, agreement / logit SQNR"] + names, rows) + ["", measured_at(*runs.values(), labels=names)]


def models(data: dict[str, dict]) -> list:
    runs = model_runs(data)
    lines = ["## The three offline models",
             "`python -m bench.accuracy --model efficientnet_lite1` (and `lite2`) writes `accuracy_<model>.json`; "
             "Lite0's rows come from `accuracy.json`. Same protocol as above: the sample without the calibration "
             "images, defaults with the bias fit. Cells: top-1 % / agreement % / logit SQNR dB.",
             measured_at(*runs.values(), labels=[m.replace("efficientnet_", "") for m in runs]),
             table(["model", "float top-1 %"], [[m.replace("efficientnet_", ""), pct(d["top1_fp"])]
                                                  for m, d in runs.items()])]
    for m, d in runs.items():
        lines += [f"`{m}` ({d['n_images']} images):", table(["method"] + MODEL_BITS, [
            [meth] + [f"{pct(r['top1'])} / {pct(r['agreement'])} / {r['logit_sqnr_db']:.1f}"
                      for r in (_row(d, meth, b) for b in MODEL_BITS)] for meth in MODEL_METHODS])]
    return lines


def advise(d: dict) -> list:
    rows = [[r["label"], f"{r['input_budget_used']:.3f}",
             "" if r.get("predicted_sqnr_db") is None else f"{r['predicted_sqnr_db']:.1f}", pct(r["top1"]),
             pct(r["agreement"]), f"{r['logit_sqnr_db']:.2f}"] for r in d["rows"]]
    diffs = [[x["a"], x["b"], f"{x['difference'] * 100:+.1f} ± {x['half_width_95'] * 100:.1f}",
              f"{x['sqnr_difference_db']:+.2f}"] for x in d["differences"]]
    real = d.get("seconds_sensitivity_real")
    return ["## Advisor: mixed precision under a budget",
            "`python -m bench.advise` writes `advise.json`, `advise.md` and the curve `docs/advise-budgets.svg`. "
            f"EfficientNet-Lite0, SPIQ, 8-bit weights; per-layer input widths from {', '.join(map(str, d['widths']))} "
            "chosen by `spiq advise` under an average-input-bits budget ([advise.md](advise.md)). Every row is scored "
            f"on {d['n_images']} held-out sample images; \"(real)\" rows drive the same search with the 32 calibration "
            "images instead of distilled ones. " + measured_at(d),
            table(["recipe", "avg input bits", "predicted SQNR, dB", "top-1 %", "agreement %", "logit SQNR, dB"], rows),
            "Agreement difference in points, with the ~95 % interval of the paired difference, and logit SQNR "
            "difference in dB:", table(["advised", "against", "agreement", "logit SQNR"], diffs),
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
    return ["## The app under load", "`python -m bench.app_load` writes `app_load.json`: new pages in a real Chromium, "
            "times from navigation to the first prediction's text and plot, with the load from gradio_client "
            "sessions (visitors whose browsers run elsewhere, as on a Space); `--load browser` writes "
            "`app_load_browser.json`, the load from Chromium pages sharing this machine's 2 cores. "
            + measured_at(*([d, browser] if browser is not None else [d]), labels=["`app_load.json`", "`app_load_browser.json`"]),
            table(["measure", "measured", "target"], rows),
            *([d["notes"]] if d.get("notes") else []), *([browser["notes"]] if browser and browser.get("notes") else [])]


def background(d: dict) -> list:
    rows = [[k, f"{r['quiet_s']:.2f}", f"{r['with_background_s']:.2f}", f"{r['slowdown'] * 100:+.0f} %"]
            for k, r in d["rows"].items()]
    load = ", ".join(f"{x:.1f}" for x in d["load_average"])
    return ["## Background distillation", "`python -m bench.background` writes `background.json`: a visitor's requests "
            "timed while a `spiq distill` child distils at nice 19 and SCHED_IDLE on one thread, as the app's "
            f"background does. Medians of {d['repeats']} requests of each kind, with the child stopped (quiet) and "
            "running in turn, so both see the same machine. " + measured_at(d),
            table(["request", "quiet, s", "with the child distilling, s", "slowdown"], rows),
            f"Target: at most {d['target_slowdown'] * 100:.0f} % slower. Load average at the end of the run: {load}."]


def advise_headline(d: dict) -> list[str]:
    """The README's lines on the advisor: each advised budget against the uniform width it spends."""
    rows = {r["label"]: r for r in d["rows"]}
    pairs = [(f"advised {b} (distilled)", f"uniform W8A{u}") for b, u in (("4.0", 4), ("4.5", 5))]
    said = [f"at {a.split()[1]} bits {pct(rows[a]['agreement'])} % / {rows[a]['logit_sqnr_db']:.1f} dB against "
            f"{u.split()[1]}'s {pct(rows[u]['agreement'])} % / {rows[u]['logit_sqnr_db']:.1f} dB" for a, u in pairs
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


def int8(d: dict, base: str) -> list:
    res, t, n = {r["variant"]: r for r in d["results"]}, d["targets"], d["n_images"]
    spiq, static, own = res["SPIQ int8"], res["ORT static int8"], d["spiq"]["SPIQ int8"]
    short = round(abs(t["top1_vs_static"]["value"]) * n)   # top-1 differences are whole images
    ops = lambda v: ", ".join(f"{k} {op}" for op, k in d["ort_ops"][v].items())  # noqa: E731
    always, fuse = res["SPIQ int8 (fold=always)"], same_kernels(d["ort_ops"], "SPIQ int8", "ORT static int8")
    alike = same_kernels(d["ort_ops"], "SPIQ int8", "SPIQ int8 (fold=always)")
    # the two SPIQ graphs differ by the machine alone when they run the same kernels: SPIQ's gap to ORT static int8 is
    # noise if it is no larger than theirs
    noise = alike and abs(shown(spiq["b1_vs_static"], 2) - 1) <= abs(shown(always["b1_vs_static"], 2)
                                                                     - shown(spiq["b1_vs_static"], 2))
    return [
        "## Real int8", f"`python -m bench.int8` writes `int8.json` and `int8.md`. ONNX Runtime {d['onnxruntime']}, "
        f"{d['threads']} threads, static shapes, {n} images; latency is the median of {d['runs']} runs interleaved across "
        "variants. ORT static int8 is `quantize_static` calibrated on the same 32 images as the `calib-*` methods. SPIQ int8 "
        "is `spiq export` of SPIQ W8A8 (default `fold=\"auto\"`, and `fold=\"always\"`). How the graph is built: "
        "[export.md](export.md).", *ran_on(d, base),
        table(["variant", "top-1 %", "batch 1 ms", "batch 16 ms", "b1 × ORT static", "b16 × ORT static", "b1 × ORT FP32"],
              [[r["variant"], pct(r["top1"]), f"{r['b1_ms']:.2f}", f"{r['b16_ms']:.1f}", f"{r['b1_vs_static']:.2f}",
                f"{r['b16_vs_static']:.2f}", f"{r['b1_vs_fp32']:.2f}"] for r in d["results"]]), "Parity on the same images:",
        table(["SPIQ int8 (ONNX Runtime) against", "top-1 agreement %", "logit SQNR dB"],
              [[label, pct(own[k]["agreement"]), f"{own[k]['logits_sqnr_db']:.1f}"] for label, k in [
                  ("the simulation of its config (SPIQ's own grids)", "parity"),
                  ("the simulation of the same config with `int8_graph=True`", "parity_int8_graph")]]), "Targets:",
        table(["target", "measured", "goal", "met"], [[INT8_TARGETS.get(k, k), f"{v['value']:.3f}", v["target"].replace(
            "<=", "≤").replace(">=", "≥"), "yes" if v["met"] else "no"] for k, v in t.items()]),
        (f"- SPIQ int8 runs at {spiq['b1_vs_static']:.2f}× ORT static int8's latency at batch 1 and "
         f"{spiq['b16_vs_static']:.2f}× at batch 16. The `fold=\"always\"` graph, with {'the same' if alike else 'other'} "
         f"kernels, measures {always['b1_vs_static']:.2f}× in the same rounds"
         + (", so batch-1 differences of this size are the machine's." if noise else
            ", closer to SPIQ int8 than SPIQ int8 is to ORT static int8." if alike else ".")
         + f" Against ORT FP32: {spiq['b1_vs_fp32']:.2f}× at batch 1, {spiq['b16_vs_fp32']:.2f}× at batch 16.",
         f"- Its top-1 is {short} image{'s' * (short != 1)} {'under' if spiq['top1'] < static['top1'] else 'over'} ORT "
         f"static int8's ({pct(spiq['top1'])} against {pct(static['top1'])} %), which calibrates on images from the same "
         "sample while SPIQ sees none." + " This is the one target not met." * ([k for k, v in t.items() if not v["met"]]
                                                                               == ["top1_vs_static"]),
         ("- ONNX Runtime fuses both int8 graphs into the same kernels" if fuse else
          "- ONNX Runtime fuses the two int8 graphs into different kernels") + " (ops after its optimisation):"),
        ["  " + line for line in table(["variant", "ops"], [[v, ops(v)] for v in ("SPIQ int8", "ORT static int8")])],
        (f"- The int8 graph agrees with its `int8_graph` simulation on {pct(own['parity_int8_graph']['agreement'])} % of "
         "top-1s; the gap to SPIQ's own simulation is explained in [export.md](export.md#parity).",)]


def ort_quantizer(d: dict, base: str) -> list:
    ratio, check, load = d["ratio_ort_quantizer_over_hand_written"], d["override_check"], d["machine"].get("load_average_after")
    alike = same_kernels(d["ort_ops"], "hand-written", "ORT quantizer")
    (hand, ortq), kernels = d["results"], "the same kernels" if alike else "different kernels"
    parity = pct(hand["agreement"]) == pct(ortq["agreement"])   # as the table shows them
    differ = ["kernels"] * (not alike) + [f"parity ({pct(ortq['agreement'])} against {pct(hand['agreement'])} %)"] * (not parity)
    return [
        "## The int8 graph written by ONNX Runtime's quantizer", "`python -m bench.ort_quantizer` writes "
        "`ort_quantizer.json`. The same SPIQ W8A8 `int8_graph` model written two ways: the hand-written QDQ graph of "
        "`spiq.export_onnx`, and the folded float model exported with `torch.onnx` then `quantize_static` with "
        "`TensorQuantOverrides` carrying the export plan's scales and zero points. "
        f"ONNX Runtime {d['onnxruntime']}, {d['threads']} threads, {d['n_images']} images, median of {d['runs']} "
        "interleaved runs.", *ran_on(d, base),
        table(["int8 graph", "agreement with the `int8_graph` simulation %", "logit SQNR dB", "top-1 %", "batch 1 ms",
               "batch 16 ms"], [[r["variant"], pct(r["agreement"]), f"{r['logits_sqnr_db']:.1f}", pct(r["top1"]),
                                 f"{r['b1_ms']:.2f}", f"{r['b16_ms']:.1f}"] for r in d["results"]]),
        f"The quantizer's graph takes {ratio['b1']:.2f}× the hand-written one's time at batch 1 and {ratio['b16']:.2f}× "
        f"at batch 16{f' (load average {load[0]:.1f} while it ran)' if load else ''}; after ONNX Runtime's fusions "
        f"{'both' if alike else 'they'} run {kernels}. {check['activation_ok']} of {check['activation_quantizers']} "
        f"activation quantizers and {check['weight_codes_ok']} of {check['weights']} weights carry exactly the plan's "
        "grids. " + ("The hand-written emitter stays: the same kernels and parity, and no workaround for what the quantizer "
                     "cannot express (see [export.md](export.md))." if not differ else
                     f"The quantizer's graph differs in {and_join(differ)}; the hand-written emitter needs no workaround "
                     "for what the quantizer cannot express (see [export.md](export.md)).")]
