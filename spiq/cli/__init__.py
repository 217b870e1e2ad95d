"""The `spiq` command: one module per verb, each adding its parser with `add(sub)`: list models,
evaluate a method on labelled images, sweep models x methods x bits, export int8 ONNX, distill the
images the bias fit needs ahead of time, advise per-layer widths under a budget, report a recipe in
one offline HTML file."""
from __future__ import annotations

import argparse
import sys

from spiq.cli import advise, distill, evaluate, export, report, sweep
from spiq.core.errors import SpiqError
from spiq.core.memory import keep_freed_memory

VERBS = (evaluate, sweep, export, advise, distill, report)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, as every other error of spiq: `usage` would bury it under the whole synopsis
        self.exit(2, f"spiq: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spiq", description="Data-free post-training quantization of vision networks.")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except SpiqError as exc:   # any other exception is a bug, and keeps its traceback
        print(f"spiq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
