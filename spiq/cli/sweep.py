"""`spiq sweep`: models x methods x bits on a folder, one JSON per cell, a merged CSV and an HTML report."""
from __future__ import annotations

import sys
from pathlib import Path

from spiq.cli.common import IMAGES_HELP, add_scale_args, bit_list, check_output_folder, names, positive, scale_device, skipper
from spiq.config import ConfigError, QuantConfig, read_recipe_text
from spiq.models.registry import get_spec


def run(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.sweep import Scale, Sweep, merge, mark_pareto, run_sweep, write_csv
    from spiq.analysis.sweep_report import write_report

    device = scale_device(args)

    base = QuantConfig.from_json(read_recipe_text(args.config, f"--config {args.config}")) if args.config else QuantConfig()
    if args.calib_n is not None:
        base = base.replace(calib_images=args.calib_n)
    cells, n_images = _sweep_cells(args, base)
    check_output_folder(args.out, "--out")
    sweep = Sweep(args.images, Path(args.out), base, args.limit, args.calib, args.strict,
                  Scale(str(device), args.batch_size, args.workers))
    if not args.calib and any(c.needs_calibration for c in _sweep_configs(args, base)):
        print(f"note: calibrating on {base.calib_images} images drawn from {args.images} "
              "(pass --calib DIR for images kept apart from the evaluation)", file=sys.stderr)
    bars, skipped = [], {}

    def bar_for(desc, total):
        def progress(n):   # made at the first image: a model whose images are cached shows no bar
            if not bars or bars[-1].desc != desc:
                bars.append(tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False))
            bars[-1].update(n)
        return progress

    with tqdm(total=len(cells), desc="sweep cells", unit="cell", file=sys.stderr) as cell_bar:
        try:
            todo = run_sweep(sweep, cells, args.jobs, done=lambda cell: cell_bar.update(1),
                             loading=lambda m: bar_for(f"loading images for {m}", n_images),
                             calibrating=lambda m: bar_for(f"calibration images for {m}", base.calib_images),
                             on_skip=skipper(args, skipped),
                             start=lambda n: cell_bar.update(len(cells) - n))
        finally:
            for bar in bars:
                bar.close()
    records = mark_pareto(merge(sweep.cells_dir))
    write_csv(records, sweep.out / "sweep.csv")
    write_report(records, sweep.out / "report.html")
    print(f"{len(cells)} cells ({len(todo)} computed, {len(cells) - len(todo)} already there); "
          f"{len(records)} in {sweep.out / 'sweep.csv'} and {sweep.out / 'report.html'}")
    return 0


def _sweep_configs(args, base: QuantConfig) -> list[QuantConfig]:
    """Every (method, bits) the sweep will run, each checked as a QuantConfig: bad values refused up front."""
    for flag, values in (("--model", args.model), ("--methods", args.methods), ("--wbits", args.wbits),
                         ("--abits", args.abits)):
        if not values:
            raise ConfigError(f"{flag} is empty: give a comma-separated list")
    if "fp" in args.methods:
        raise ConfigError("--methods: fp is the reference every cell is compared with, not a cell")
    return [base.replace(method=m, weight_bits=w, input_bits=a)
            for m in args.methods for w in args.wbits for a in args.abits]


def _sweep_cells(args, base: QuantConfig):
    from spiq.analysis.sweep import plan_cells
    from spiq.models.folders import find_images

    _sweep_configs(args, base)
    for model in args.model:
        get_spec(model)   # an unknown name: KeyError with the close ones
    n_images = len(find_images(args.images)[: args.limit])   # a missing or empty folder, before any work
    if args.calib:
        find_images(args.calib)
    return plan_cells(args.model, args.methods, args.wbits, args.abits), n_images


def add(sub) -> None:
    s = sub.add_parser("sweep", help="models x methods x bits on labelled images: one JSON per cell, a CSV, an HTML report")
    s.add_argument("--model", required=True, type=names, help="a name from `spiq models`, or a comma list")
    s.add_argument("--images", required=True, help=IMAGES_HELP)
    s.add_argument("--methods", required=True, type=names, help="comma list of methods, e.g. spiq,static-tensor")
    s.add_argument("--wbits", required=True, type=bit_list, help="comma list of weight bits (2-16), e.g. 8,4")
    s.add_argument("--abits", required=True, type=bit_list, help="comma list of input bits (2-16), e.g. 8,6,4")
    s.add_argument("--limit", type=positive, help="evaluate only the first N images (unreadable ones included)")
    s.add_argument("--config", help="QuantConfig JSON every cell starts from; the cells set method and bits")
    s.add_argument("--calib", help="calibration image folder for calib-* and liu-ptq (default: --images)")
    s.add_argument("--calib-n", type=positive, help="number of calibration images")
    s.add_argument("--out", required=True, help="folder: cells/ (one JSON per cell), cache/, sweep.csv, report.html")
    s.add_argument("--jobs", type=positive, default=1, help="cells computed in this many processes (default 1)")
    s.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    add_scale_args(s)
    s.set_defaults(func=run)
