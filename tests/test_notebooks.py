"""The notebooks in notebooks/: kept in git without outputs, and each run top to bottom in a fresh
kernel, any cell's error failing the test (the slow tier: minutes of quantizing)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# What CI gives the accuracy notebook: every method, but one bit width on the first 24 images,
# so it runs in a couple of minutes; its defaults make the README's whole table.
OVERRIDES = {"accuracy.ipynb": 'LIMIT = 24\nBITS = ["W8A4"]'}


def tracked_notebooks() -> list[Path]:
    """The notebooks git holds (or would, once added): a stray local copy is not checked."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.ipynb"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:   # not a git checkout (an sdist): every notebook there is
        return sorted(ROOT.rglob("*.ipynb"))
    return sorted(ROOT / line for line in out.stdout.split())


def test_the_notebooks_are_there():
    assert {p.name for p in tracked_notebooks() if p.parent == NOTEBOOKS} >= {"tour.ipynb", "accuracy.ipynb"}


@pytest.mark.parametrize("path", tracked_notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_are_stripped(path):
    """Outputs in git bloat it (plotly.js alone is 4.6 MB) and stale them: `python notebooks/strip.py`."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and
             (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run python notebooks/strip.py"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state in the metadata"


def _with_overrides(nb, name: str):
    """The notebook with the test's parameters in a cell right after its `parameters` cell (as papermill does)."""
    import nbformat

    if name not in OVERRIDES:
        return nb
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(OVERRIDES[name], id="test-overrides"))
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tour.ipynb", "accuracy.ipynb"])
def test_notebook_runs_top_to_bottom(name):
    import nbformat
    from nbclient import NotebookClient

    nb = _with_overrides(nbformat.read(NOTEBOOKS / name, as_version=4), name)
    # The kernel imports this checkout's spiq, and runs on the Python that runs the tests.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)   # raises CellExecutionError, naming the cell, on the first error
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "no plotly figure rendered inline"
    if name == "tour.ipynb":   # the predictions, a matplotlib still, drawn as an image too
        assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
