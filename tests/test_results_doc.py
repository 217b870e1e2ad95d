"""docs/results.md and the README's headline table are generated from bench/results/*.json by
`python -m bench.results_doc`."""
import ast
import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

from bench import results_doc, results_more

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "results_doc.py"


def _headline(readme_text: str) -> str:
    return readme_text.split(results_doc.START)[1].split(results_doc.END)[0]


def test_committed_page_and_readme_table_are_the_generated_ones():
    out = results_doc.generate()
    assert out[results_doc.DOC] == results_doc.DOC.read_text(), "run python -m bench.results_doc"
    assert _headline(out[results_doc.README]) == _headline(results_doc.README.read_text()), "run python -m bench.results_doc"
    assert out[results_doc.README] == results_doc.README.read_text()   # nothing outside the markers changes


def test_check_passes_on_the_committed_files():
    assert results_doc.main(["--check"]) == 0


def test_a_changed_number_changes_the_page_and_the_readme(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    shutil.copytree(results_doc.RESULTS, results)
    doc, readme = tmp_path / "results.md", tmp_path / "README.md"
    shutil.copy(results_doc.README, readme)
    for name, path in [("RESULTS", results), ("DOC", doc), ("README", readme)]:
        monkeypatch.setattr(results_doc, name, path)   # main() then reads and writes only the copies
    assert results_doc.main([]) == 0 and results_doc.main(["--check"]) == 0
    before = {doc: doc.read_text(), readme: readme.read_text()}

    data = json.loads((results / "accuracy.json").read_text())
    row = next(r for r in data["results"] if r["label"] == "spiq" and r["bits"] == "W8A4")
    row["agreement"] = 0.5                                 # 85.9 % in the committed run
    (results / "accuracy.json").write_text(json.dumps(data))
    after = results_doc.generate(results, doc, readme)

    assert after[doc] != before[doc] and after[readme] != before[readme]
    assert "| spiq | 87.0 / 99.4 / 25.2 | 87.4 / 97.6 / 16.1 | 87.0 / 96.4 / 14.4 | 85.5 / 94.0 / 11.7 | 79.7 / 50.0 / 6.6 |" \
        in after[doc]
    assert "| `spiq` | 99.4 % / 25.2 dB | 50.0 % / 6.6 dB |" in after[readme]
    # the prose follows the JSON too, not only the tables
    assert "85.9 % against 84.8 (static)" in " ".join(before[doc].split())
    assert "50.0 % against 84.8 (static)" in " ".join(after[doc].split())
    assert results_doc.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{doc} and {readme} out of date" in err


def test_the_page_and_the_readme_say_which_commit_the_numbers_come_from(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(results_doc.RESULTS, results)
    readme = tmp_path / "README.md"
    shutil.copy(results_doc.README, readme)
    assert all("commit" in json.loads(p.read_text()) for p in results.glob("*.json"))   # bench/common.py's save()
    data = json.loads((results / "accuracy.json").read_text())
    was = f"Measured at commit `{data['commit']}`."
    out = results_doc.generate(results, tmp_path / "results.md", readme)
    accuracy_section = out[tmp_path / "results.md"].split("## Accuracy")[1].split("##")[0]
    assert was in _headline(out[readme]) and was in accuracy_section

    data["commit"] = "abc1234-dirty"   # measured on a checkout with changes not yet committed
    (results / "accuracy.json").write_text(json.dumps(data))
    out = results_doc.generate(results, tmp_path / "results.md", readme)
    now = "Measured at commit `abc1234` with uncommitted changes."
    accuracy_section = out[tmp_path / "results.md"].split("## Accuracy")[1].split("##")[0]
    assert now in _headline(out[readme]) and now in accuracy_section and was not in _headline(out[readme])
    # the int8 line of the headline keeps its own file's commit
    int8 = json.loads((results / "int8.json").read_text())["commit"]
    assert f"`bench/results/int8.json`, measured at commit `{int8}`" in _headline(out[readme])


def test_the_script_needs_only_the_standard_library():
    """The page's sections live in results_more.py, their shared wording in results_format.py; bench/__init__.py
    imports nothing, so CI checks the page without torch or spiq."""
    siblings = {"bench.results_more", "bench.results_format"}
    for script in [SCRIPT.with_name(n) for n in ("results_doc.py", "results_more.py", "results_format.py", "__init__.py")]:
        tree = ast.parse(script.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module + "." + a.name if n.module == "bench" else n.module
                     for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        outside = {m for m in imported if m.split(".")[0] not in set(sys.stdlib_module_names) | {"__future__"}}
        assert outside <= siblings, script.name


# Each conclusion the page draws is chosen by comparing the numbers it cites: feed the section the committed JSON,
# then the same JSON with those numbers turned around, and the words turn with them.

def _data(name: str) -> dict:
    return json.loads((results_doc.RESULTS / f"{name}.json").read_text())


def _text(blocks) -> str:
    """A section's prose and bullets as one line of text, whatever its block kinds."""
    flat = [s for b in blocks for s in ([b] if isinstance(b, str) else b)]
    return " ".join(" ".join(flat).split())


def _accuracy_notes(acc: dict) -> str:
    pair = lambda r: f"{r['difference']:+.3f}"  # noqa: E731
    return _text(results_doc.accuracy_notes(acc, pair))


def test_the_int8_conclusions_follow_their_numbers():
    d = _data("int8")
    before = _text(results_more.int8(d, ""))
    assert "with the same kernels, measures 0.93× in the same rounds, so batch-1 differences of this size are the " \
           "machine's." in before
    assert "fuses both int8 graphs into the same kernels" in before

    far = copy.deepcopy(d)   # SPIQ int8 now 0.20 from ORT static int8, the two SPIQ graphs 0.05 from each other
    res = {r["variant"]: r for r in far["results"]}
    res["SPIQ int8"]["b1_vs_static"], res["SPIQ int8 (fold=always)"]["b1_vs_static"] = 1.20, 1.15
    text = _text(results_more.int8(far, ""))
    assert "differences of this size are the machine's" not in text
    assert "closer to SPIQ int8 than SPIQ int8 is to ORT static int8" in text

    other = copy.deepcopy(d)   # ORT static int8 now runs a float convolution among its int8 ones
    other["ort_ops"]["ORT static int8"]["Conv"] = 1
    assert "fuses the two int8 graphs into different kernels" in _text(results_more.int8(other, ""))


def test_the_ort_quantizer_conclusions_follow_their_numbers():
    d = _data("ort_quantizer")
    before = _text(results_more.ort_quantizer(d, ""))
    assert "both run the same kernels" in before and "The hand-written emitter stays: the same kernels and parity" in before

    flipped = copy.deepcopy(d)
    flipped["ort_ops"]["ORT quantizer"]["QLinearConv"] -= 1
    flipped["ort_ops"]["ORT quantizer"]["Conv"] = 1
    flipped["results"][1]["agreement"] -= 0.01
    text = _text(results_more.ort_quantizer(flipped, ""))
    assert "they run different kernels" in text and "emitter stays" not in text
    assert "differs in kernels and parity (98.6 against 99.6 %)" in text


def test_the_accuracy_conclusions_follow_their_numbers():
    acc = _data("accuracy")
    before = _accuracy_notes(acc)
    assert "except calibrated per-channel ranges (65.2 %): the weights decide. SQuant rounding carries them" in before
    assert "(`calib-mse (per channel)`) lose at every width" in before

    flipped = copy.deepcopy(acc)
    next(r for r in flipped["results"] if r["label"] == "spiq" and r["bits"] == "W4A8")["agreement"] = 0.60
    rtn = next(r for r in flipped["weight_options"] if r["label"] == "round to nearest" and r["method"] == "spiq")
    rtn["agreement"] = 0.90   # round to nearest now ahead of SQuant's 83.8 %
    for r in flipped["differences"]:
        if r["baseline"] == "calib-mse (per channel)" and r["bits"] in ("W8A8", "W8A6", "W6A6", "W8A5"):
            r["difference"] = -0.01   # per-channel calibration now ahead of SPIQ at four widths of seven
    text = _accuracy_notes(flipped)
    assert "the weights decide" not in text and "60–84 %" in text and "the input ranges still tell them apart" in text
    assert "SQuant rounding does not carry them" in text
    assert "lose at 3 of 7 widths" in text


def test_the_weight_option_conclusions_follow_their_numbers():
    rows = _data("accuracy")["weight_options"]
    before = _text(results_doc.weight_options(rows))
    assert "SQuant rounding carries 4-bit weights" in before
    assert "Cross-layer equalization barely moves SPIQ's per-channel weights" in before
    assert "It costs per-tensor activations (static-tensor -2.1 points) and is what makes per-tensor 4-bit weights " \
           "usable at all (0 → 44–50 %)" in before

    flipped = copy.deepcopy(rows)
    get = {(r["label"], r["method"]): r for r in flipped}
    get["round to nearest", "spiq"]["agreement"] = 0.90
    get["SQuant, cross-layer equalization", "spiq"]["agreement"] = 0.75         # -8.8 points from SQuant's 83.8
    get["SQuant, cross-layer equalization", "static-tensor"]["agreement"] = 0.85  # +1.5 from 83.5
    for m in ("spiq", "static-tensor"):
        get["per-tensor weights, SQuant, cross-layer equalization", m]["agreement"] = 0.001
    text = _text(results_doc.weight_options(flipped))
    assert "SQuant rounding does not carry 4-bit weights" in text
    assert "barely moves" not in text and "Cross-layer equalization moves SPIQ by -8.8 points" in text
    assert "It does not cost per-tensor activations (static-tensor +1.5 points) and does not rescue per-tensor 4-bit " \
           "weights (0 → 0–0 %)" in text


def test_the_bias_fit_agreement_sentence_follows_its_numbers():
    acc = _data("accuracy")
    assert "Agreement moves by a few images either way (-2.1 to +3.6 points)" in _text(results_doc.accuracy(acc, ""))
    up = copy.deepcopy(acc)   # the fit now only ever raises agreement: by 0.1 points, and by 10 (47 images) at W8A4
    fitted = {(r["label"], r["bits"]): r["agreement"] for r in up["results"]}
    for r in up["without_bias_fit"]:
        r["agreement"] = fitted[r["label"], r["bits"]] - (0.10 if r["bits"] == "W8A4" else 0.001)
    text = _text(results_doc.accuracy(up, ""))
    assert "Agreement moves up by up to 47 images (+0.1 to +10.0 points)" in text and "either way" not in text


@pytest.mark.parametrize("liu_s, words", [(257.8, "The search is the cost: 258 s"),
                                          (1.0, "The search costs no more than SPIQ: 1 s")])
def test_the_vit_search_cost_sentence_follows_its_numbers(liu_s, words):
    toys = {n: copy.deepcopy(_data(f"vit_toy_{s}")["results"][n]) for s, n in (("tiny", "toy_vit_tiny"),
                                                                                  ("small", "toy_vit_small"))}
    next(r for r in toys["toy_vit_small"] if r["label"] == "liu-ptq W8A8")["quantize_s"] = liu_s
    text = _text(results_doc.vit_notes(toys))
    assert words in text
    assert "spends more activation bits too" in text
    for r in toys["toy_vit_tiny"]:   # mixed precision now spends fewer bits than the uniform width
        if r["label"].startswith("liu-ptq mixed"):
            r["module_bits"] = {k: v - 1 for k, v in r["module_bits"].items()}
    text = _text(results_doc.vit_notes(toys))
    assert "more activation bits" not in text and "7.25 activation bits per module on average at 8" in text
