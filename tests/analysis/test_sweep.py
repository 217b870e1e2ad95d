"""`spiq sweep`: one JSON per cell written as it finishes, a resumed sweep skips what is done, the
merged CSV and the offline HTML report, the Pareto front. On the toy CNN and three example photos,
so the fast tier needs nothing outside the repository."""
import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from spiq.analysis import sweep as sweep_mod
from spiq.analysis.sweep import CELL_FIELDS, Cell, mark_pareto, pareto_front, read_cell, write_cell
from conftest import TOY_CNN as TOY, labelled_photos

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path):
    images = labelled_photos(tmp_path / "imgs")
    recipe = tmp_path / "recipe.json"
    # no distillation, no rounding search: a cell in seconds, not minutes
    recipe.write_text(json.dumps({"bias_images": 0, "weight_rounding": "nearest"}))
    return images, recipe


@pytest.fixture
def quantize_calls(monkeypatch):
    """How many times a cell quantized: evaluate() is where a cell quantizes."""
    from spiq.analysis import evaluate

    calls = []
    real = evaluate.quantize

    def counting(*args, **kwargs):
        calls.append(kwargs.get("calib_data"))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "quantize", counting)
    return calls


def _sweep(folder, out, *extra, methods="static-tensor,dynamic-channel", abits="8,4"):
    from spiq import cli

    images, recipe = folder
    return cli.main(["sweep", "--model", TOY, "--images", str(images), "--methods", methods,
                     "--wbits", "8", "--abits", abits, "--limit", "3", "--config", str(recipe), "--out", str(out),
                     *extra])


def test_cells_are_written_equal_evaluate_and_a_second_run_skips_them(toy_model, folder, tmp_path, capsys,
                                                                      quantize_calls, monkeypatch):
    from spiq import cli

    out = tmp_path / "out"
    assert _sweep(folder, out) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "4/4" in err   # the cells' progress bar
    names = sorted(p.name for p in (out / "cells").iterdir())
    assert names == sorted(f"{TOY}__{m}__W8A{a}.json" for m in ("static-tensor", "dynamic-channel") for a in (8, 4))
    assert len(quantize_calls) == 4
    cell = json.loads((out / "cells" / f"{TOY}__static-tensor__W8A4.json").read_text())
    assert set(cell) == set(CELL_FIELDS) and cell["n_images"] == 3 and cell["n_skipped"] == 0
    assert isinstance(cell["logit_sqnr_db"], float)

    # the same cell through `spiq evaluate` gives the same numbers
    images, recipe = folder
    assert cli.main(["evaluate", "--model", TOY, "--images", str(images), "--method", "static-tensor", "--wbits", "8",
                     "--abits", "4", "--limit", "3", "--config", str(recipe), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert {k: cell[k] for k in ev if k != "seconds"} == {k: v for k, v in ev.items() if k != "seconds"}

    # a second run computes nothing, decodes nothing, and leaves the cell files as they were
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    monkeypatch.setattr(sweep_mod, "load_images", lambda *a, **k: pytest.fail("images decoded again"))
    quantize_calls.clear()
    assert _sweep(folder, out) == 0
    assert quantize_calls == [] and {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes
    assert "0 computed, 4 already there" in capsys.readouterr().out

    # a cell cut short is computed again, from the cached images
    cut = out / "cells" / f"{TOY}__dynamic-channel__W8A8.json"
    cut.write_text(cut.read_text()[:40])
    assert _sweep(folder, out) == 0
    assert len(quantize_calls) == 1 and read_cell(cut) is not None

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"static-tensor", "dynamic-channel"}
    assert any(r["pareto"] == "True" for r in rows)
    assert (out / "report.html").stat().st_size > 1_000_000   # plotly inlined


def _record(model, method, w, a, agreement):
    return {"model": model, "method": method, "wbits": w, "abits": a, "n_images": 10, "top1": agreement - 0.1,
            "top1_fp": 0.8, "agreement": agreement, "seconds": 1.0, "n_skipped": 0, "logit_sqnr_db": 4.0 * a,
            "inputs": "x"}


def test_the_report_is_one_offline_file_with_one_figure_per_panel(tmp_path):
    from spiq.analysis.sweep import merge
    from spiq.analysis.sweep_report import write_report

    for w in (8, 4):   # cells from anywhere, merged from the folder
        for a in (8, 6, 4):
            for method in ("spiq", "static-tensor"):
                rec = _record("lite", method, w, a, 1 - (16 - w - a) / 20 - (method == "static-tensor") / 50)
                write_cell(tmp_path / "cells", Cell("lite", method, w, a), rec)
    records = merge(tmp_path / "cells")
    assert len(records) == 12
    write_report(records, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "plotly.js v" in page   # the bundle itself, inlined
    assert not re.search(r"<script[^>]+src=[\"']?https?:", page)
    # two weight widths × (agreement, top-1, logit SQNR), then the Pareto figure
    assert page.count('class="plotly-graph-div"') == 2 * 3 + 1
    assert "Pareto front" in page and "W4: logit SQNR" in page


def test_a_cell_computed_on_other_inputs_is_computed_again(toy_model, folder, tmp_path, quantize_calls):
    out = tmp_path / "out"
    assert _sweep(folder, out, methods="dynamic-channel", abits="8") == 0
    quantize_calls.clear()
    assert _sweep(folder, out, "--limit", "2", methods="dynamic-channel", abits="8") == 0   # other images
    assert len(quantize_calls) == 1
    assert json.loads((out / "cells" / f"{TOY}__dynamic-channel__W8A8.json").read_text())["n_images"] == 2


def test_calibrated_methods_calibrate_as_evaluate_does(toy_model, folder, tmp_path, capsys, quantize_calls):
    from spiq import cli

    images, recipe = folder
    out = tmp_path / "out"
    rc = cli.main(["sweep", "--model", TOY, "--images", str(images), "--methods", "calib-minmax,dynamic-channel",
                   "--wbits", "8", "--abits", "6", "--calib-n", "2", "--config", str(recipe), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "note: calibrating on 2 images drawn from" in err
    calib, plain = quantize_calls
    assert calib is not None and len(calib) == 2 and plain is None   # only the calib-* cell reads them


def test_read_cell_refuses_what_is_not_a_whole_cell(tmp_path):
    from spiq.analysis.sweep import plan_cells

    assert [c.name for c in plan_cells(["m"], ["spiq", "spiq"], [8], [8, 4, 8])] == ["m__spiq__W8A8", "m__spiq__W8A4"]
    cell = Cell("m", "spiq", 8, 4)
    record = {k: 1 for k in CELL_FIELDS} | {"model": "m", "method": "spiq", "wbits": 8, "abits": 4}
    path = write_cell(tmp_path, cell, record)
    assert path.name == "m__spiq__W8A4.json" and read_cell(path) == record
    assert not list(tmp_path.glob(".*"))   # no temp file left beside it
    renamed = tmp_path / "m__spiq__W8A6.json"
    shutil.copy(path, renamed)
    assert read_cell(renamed) is None
    path.write_text(path.read_text()[:-10])
    assert read_cell(path) is None
    path.write_text(json.dumps({"model": "m"}))
    assert read_cell(path) is None


def test_pareto_front_on_hand_made_points():
    points = [(8, 0.99), (6, 0.97), (6, 0.95), (5, 0.97), (4, 0.80), (4, 0.85), (8, 0.90), (3, 0.10)]
    # (6, .97) is beaten by (5, .97) with fewer bits; (4, .80) by (4, .85); (8, .90) by all above it
    assert pareto_front(points) == [7, 5, 3, 0]
    assert pareto_front([]) == [] and pareto_front([(4, 0.5), (4, 0.5)]) == [0, 1]
    recs = [{"model": "a", "abits": b, "agreement": s} for b, s in [(8, 0.9), (4, 0.95)]] + \
           [{"model": "b", "abits": 8, "agreement": 0.1}]
    assert [r["pareto"] for r in mark_pareto(recs)] == [False, True, True]   # one front per model
