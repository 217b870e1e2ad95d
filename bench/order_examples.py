"""Order the app's example images: first one that shows SPIQ's point at first sight.

    python -m bench.order_examples [--bits 4]

For every image in assets/: the float model's top-1 and how clear it is, and at W8A<bits> whether
SPIQ keeps that top-1 while static per-tensor (the DFQ-style baseline) flips it or loses at
least 2 dB of logit SQNR (`spiq.analysis.examples`). Writes assets/examples.txt (the order the app
shows them in) and bench/results/examples.json and .md. EfficientNet-Lite0, no real data.
"""
from __future__ import annotations

import argparse
import sys

from bench.common import ROOT, machine, save

import spiq
from spiq.analysis.examples import CLEAR_MARGIN, MIN_GAP_DB, example_order, score_example
from spiq.models.data import IMAGE_EXTENSIONS, open_image

ASSETS = ROOT / "assets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4, help="input bits of the comparison (weights: 8)")
    args = p.parse_args(argv)
    loaded = spiq.load_model("efficientnet_lite0")
    q = {m: spiq.quantize(loaded, spiq.QuantConfig(method=m, weight_bits=8, input_bits=args.bits))
         for m in ("spiq", "static-tensor")}
    files = sorted(f for f in ASSETS.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    scores = [score_example(loaded, f.name, loaded.preprocess(open_image(f)), q["spiq"], q["static-tensor"])
              for f in files]
    order = example_order(scores)
    (ASSETS / "examples.txt").write_text("\n".join(order) + "\n")
    rows = sorted(scores, key=lambda s: order.index(s.name))
    md = (f"W8A{args.bits}, EfficientNet-Lite0. Shows SPIQ's point: top-1 at least {CLEAR_MARGIN}x the "
          f"runner-up, SPIQ keeps it, static per-tensor flips it or loses {MIN_GAP_DB} dB.\n\n"
          "| image | float top-1 | p | × runner-up | SPIQ keeps | static flips | SQNR gain dB | shows SPIQ |\n"
          "|---|---|---|---|---|---|---|---|\n" +
          "".join(f"| {s.name} | {s.float_top1} | {s.float_prob:.2f} | {s.margin:.2f} | {s.spiq_kept} | "
                  f"{s.static_flipped} | {s.sqnr_gain_db:+.2f} | {s.shows_spiq} |\n" for s in rows))
    print(md)
    save("examples", {"bits": args.bits, "machine": machine(), "order": order,
                      "scores": [s.to_dict() for s in rows]}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
