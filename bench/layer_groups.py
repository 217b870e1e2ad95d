"""Where the whole model loses, by layer group: each group's inputs quantized alone, every method.

    python -m bench.layer_groups [--wbits 8] [--abits 5] [--limit N]

EfficientNet-Lite0 on the ImageNet sample. For each group of layers (the stem, the pointwise
expansions that read the residual stream, the depthwise convs, the projections, the head, the
classifier) only that group's inputs get `--abits` bits and every other input 16; weights get
`--wbits` everywhere. Cells are mean logit SQNR against the float model (dB). Two more rows: every
group but the stem (whose image input costs every method the same), and the static ceiling of
the two largest groups, per-channel MSE ranges calibrated on the first 200 scored images
themselves. Writes bench/results/layer_groups_W<w>A<a>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from bench.common import SAMPLE_DIR, machine, save

import spiq
from spiq.config import LayerOverride
from spiq.analysis.evaluate import load_images, logits
from spiq.core.metrics import mean_logit_sqnr_db

METHODS = ["spiq", "static-tensor", "dynamic-tensor", "dynamic-channel"]


def group_of(name: str) -> str:
    if name.startswith("blocks.0.") and name.endswith("conv_pw"):
        return "projection"   # the first block has no expansion: its pointwise conv projects
    for suffix, group in (("conv_stem", "stem"), ("conv_dw", "depthwise"), ("conv_pwl", "projection"),
                          ("conv_pw", "expansion"), ("conv_head", "head"), ("classifier", "classifier")):
        if name.endswith(suffix):
            return group
    raise ValueError(f"{name}: not a layer of EfficientNet-Lite0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=5)
    p.add_argument("--limit", type=int)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, preprocess, _ = spiq.load_model("efficientnet_lite0")
    images, _, _ = load_images(SAMPLE_DIR, preprocess, args.limit)
    fp = logits(model, images)
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    groups = list(dict.fromkeys(group_of(n) for n in layers))

    def sqnr(method: str, outside: set[str], own: dict | None = None, calib: torch.Tensor | None = None) -> float:
        """Logit SQNR with the layers whose group is in `outside` read at 16 bits, `own` overriding others."""
        overrides = {n: LayerOverride(input_bits=16) for n in layers if group_of(n) in outside} | (own or {})
        extra = {"calib_images": len(calib)} if calib is not None else {}
        cfg = spiq.QuantConfig(method=method, weight_bits=args.wbits, input_bits=args.abits, overrides=overrides, **extra)
        return mean_logit_sqnr_db(fp, logits(spiq.quantize(model, cfg, calib_data=calib, preprocess=preprocess), images))

    rows = []
    cases = [(g, set(groups) - {g}) for g in groups] + [("all but the stem", {"stem"}), ("all", set())]
    for label, outside in tqdm(cases, desc="groups"):
        cells = {m: sqnr(m, outside) for m in METHODS}
        rows.append({"group": label, **cells})
        tqdm.write(f"{label:18s} " + "  ".join(f"{m} {v:5.2f}" for m, v in cells.items()))
    calib = images[:200]
    ceiling = {}
    for g in ("expansion", "projection"):
        own = {n: LayerOverride(method="calib-mse", input_granularity="channel") for n in layers if group_of(n) == g}
        ceiling[g] = sqnr("spiq", set(groups) - {g}, own, calib)

    bits = f"W{args.wbits}A{args.abits}"
    md = [f"Logit SQNR (dB) against the float model, {len(images)} images, only one group's inputs at "
          f"{args.abits} bits (the rest at 16), {args.wbits}-bit weights:", "",
          "| inputs quantized | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    md += [f"| {r['group']} | " + " | ".join(f"{r[m]:.2f}" for m in METHODS) + " |" for r in rows]
    md += ["", f"Static per-channel ceiling (MSE ranges calibrated on {len(calib)} of the scored images): "
           + ", ".join(f"{g} {v:.2f} dB" for g, v in ceiling.items()) + "."]
    text = "\n".join(md) + "\n"
    print(text)
    save(f"layer_groups_{bits}", {"model": "efficientnet_lite0", "n_images": len(images), "bits": bits,
                                  "machine": machine(), "rows": rows, "static_ceiling": ceiling}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
