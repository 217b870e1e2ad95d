"""Strip the notebooks' outputs, execution counts and widget state in place, for git:
`python notebooks/strip.py` (every notebook here) or `python notebooks/strip.py PATH...`."""
import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Whether `path` changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)   # nbclient's timings
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for p in paths:
        if strip(p):
            print(f"stripped {p}")
