"""How docs/results.md and the README's headline write what bench/results/*.json holds: percentages, signed
differences, tables, the commit and machine a file was measured on, and the thresholds that choose a conclusion's
words. Standard library only, like results_doc.py and results_more.py, which use it."""
from __future__ import annotations

# The words an agreement change earns, in points (one image of the accuracy sample is 0.2): under BARELY a change or a
# spread between methods barely matters; under FEW it is a few images.
BARELY, FEW = 2.0, 4.0
# Ops that convert or reshape at a graph's edges, after ONNX Runtime's fusions; the others are its arithmetic.
EDGE_OPS = {"QuantizeLinear", "DequantizeLinear", "Transpose", "Reshape", "Flatten"}

def pct(x: float) -> str:
    return f"{x * 100:.1f}"


def sign(x: float) -> str:
    return "+0.0" if f"{x:+.1f}" == "-0.0" else f"{x:+.1f}"


def gap(x: float, y: float) -> float:   # x - y as shown, so the prose's differences add up with the tables' cells
    return float(f"{x:.1f}") - float(f"{y:.1f}")


def shown(x: float, digits: int = 1) -> float:   # a number as the page prints it, so the words agree with the figures
    return float(f"{x:.{digits}f}")


def same_kernels(ops: dict[str, dict[str, int]], a: str, b: str) -> bool:
    """Whether ONNX Runtime runs graphs `a` and `b` with the same arithmetic ops (counts by op type, after its fusions)."""
    return ({k: v for k, v in ops[a].items() if k not in EDGE_OPS} == {k: v for k, v in ops[b].items() if k not in EDGE_OPS})


def and_join(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


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


def machine(d: dict) -> str:
    m = d.get("machine")
    return f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}" if m else ""


def ran_on(d: dict, base: str) -> list[str]:
    """The commit a section's numbers were measured at, and its machine where it differs from the one
    in the page's introduction."""
    return [measured_at(d) + (f" Machine: {machine(d)}." if machine(d) not in ("", base) else "")]
