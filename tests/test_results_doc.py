"""docs/results.md and the README's headline table are generated from bench/results/*.json by bench/results_doc.py."""
import ast
import json
import shutil
import sys
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "results_doc.py"
results_doc = load_script(SCRIPT)


def _headline(readme_text: str) -> str:
    return readme_text.split(results_doc.START)[1].split(results_doc.END)[0]


def test_committed_page_and_readme_table_are_the_generated_ones():
    out = results_doc.generate()
    assert out[results_doc.DOC] == results_doc.DOC.read_text(), "run python bench/results_doc.py"
    assert _headline(out[results_doc.README]) == _headline(results_doc.README.read_text()), "run python bench/results_doc.py"
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
    for script in (SCRIPT, SCRIPT.with_name("results_more.py")):   # the page's sections live in the second
        tree = ast.parse(script.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= set(sys.stdlib_module_names) | {"__future__", "results_more"}, script.name
