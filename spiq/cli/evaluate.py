"""`spiq models` and `spiq evaluate`: what loads offline, and top-1 / agreement on labelled images."""
from __future__ import annotations

import sys

from spiq.cli.common import (IMAGES_HELP, add_scale_args, bits, build_config, check_output, percent_bar, positive, scale_device,
                             skipper, write_json)
from spiq.config import METHODS
from spiq.models.registry import get_spec, list_models


def run_models(args) -> int:
    rows = []
    for name in list_models():
        spec = get_spec(name)
        problem = spec.offline_problem()
        rows.append((name, "yes" if problem is None else "no", spec.description, problem or ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'model':{width}}  available offline  description")
    for name, ok, desc, problem in rows:
        print(f"{name:{width}}  {ok:17}  {desc}" + (f"\n{'':{width}}  {'':17}  ({problem})" if problem else ""))
    return 0


def run_evaluate(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.evaluate import evaluate_folder, load_calibration
    from spiq.models.folders import find_images
    from spiq.models.registry import load_model

    config = build_config(args)
    device = scale_device(args)
    check_output(args.json, "--json")
    n = len(find_images(args.images)[: args.limit])
    loaded = load_model(args.model)
    skipped = {}
    calib = None
    if config is not None and config.needs_calibration:
        src = args.calib or args.images
        if not args.calib:
            print(f"note: calibrating on {config.calib_images} images drawn from {src} "
                  "(pass --calib DIR for images kept apart from the evaluation)", file=sys.stderr)
        with tqdm(total=config.calib_images, desc="calibration images", unit="img", file=sys.stderr) as bar:
            calib = load_calibration(src, loaded.preprocess, config.calib_images, progress=bar.update,
                                     on_skip=skipper(args, skipped))
    passes = 1 if config is None else 2
    with percent_bar("quantizing", disable=config is None) as quantizing, \
            tqdm(total=n * passes, desc=f"evaluating {args.model} {args.method or config.method} on {device}",
                 unit="img", file=sys.stderr) as bar:
        result = evaluate_folder(args.model, args.images, config, calib=calib, float_model=loaded, limit=args.limit,
                                 device=device, batch_size=args.batch_size, workers=args.workers,
                                 on_skip=skipper(args, skipped), progress=bar.update, quantize_progress=quantizing)
    print(result.summary())
    if args.json:
        write_json(args.json, {**result.to_dict(), "n_skipped": len(skipped)})
    return 0


def add(sub) -> None:
    sub.add_parser("models", help="list the models and whether they work offline").set_defaults(func=run_models)
    e = sub.add_parser("evaluate", help="top-1 and agreement with the float model on labelled images")
    e.add_argument("--model", required=True, help="a name from `spiq models`")
    e.add_argument("--images", required=True, help=IMAGES_HELP)
    e.add_argument("--method", choices=["fp", *METHODS], help="fp (float) or a quantization method")
    e.add_argument("--wbits", type=bits, help="weight bits (2-16)")
    e.add_argument("--abits", type=bits, help="input (activation) bits (2-16)")
    e.add_argument("--limit", type=positive, help="evaluate only the first N images (unreadable ones included)")
    e.add_argument("--config", help="QuantConfig JSON; --method/--wbits/--abits override its fields")
    e.add_argument("--calib", help="calibration image folder for calib-* and liu-ptq (default: --images)")
    e.add_argument("--calib-n", type=positive, help="number of calibration images")
    e.add_argument("--mixed-precision", type=float, metavar="BITS",
                   help="liu-ptq: average bits over the attention and MLP modules, one width per module")
    e.add_argument("--json", help="write the result as JSON here (n_skipped: unreadable images left out)")
    e.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    add_scale_args(e)
    e.set_defaults(func=run_evaluate)
