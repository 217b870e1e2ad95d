"""`spiq report`: one self-contained HTML file with a recipe, its accuracy on a folder and the app's
views of a few of the folder's images."""
from __future__ import annotations

import sys

from spiq.cli.common import add_scale_args, check_output, percent_bar, positive, scale_device, skipper, write_text
from spiq.config import QuantConfig, read_recipe_text
from spiq.models.registry import get_spec


def run(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.evaluate import load_images, logits
    from spiq.models.folders import find_images
    from spiq.ui.cache import ModelCache
    from spiq.ui.report import collect_views, fold_figure, pick_images, report_html

    config = QuantConfig.from_json(read_recipe_text(args.config, f"--config {args.config}"))
    check_output(args.out, "--out")
    device = scale_device(args)
    get_spec(args.model)   # an unknown name: KeyError with the close ones, before any image is read
    n = len(find_images(args.images)[: args.limit])
    cache, skipped = ModelCache(), {}
    loaded = cache.load(args.model)
    if config.needs_calibration:
        cache.use_calibration(args.model, _calibration(args, config, loaded.preprocess, skipped))
    with tqdm(total=n, desc="loading images", unit="img", file=sys.stderr) as bar:
        images, labels, paths = load_images(args.images, loaded.preprocess, args.limit, progress=bar.update,
                                            on_skip=skipper(args, skipped), workers=args.workers)
    with tqdm(total=len(labels), desc=f"float {args.model}", unit="img", file=sys.stderr) as bar:
        fp_logits = logits(loaded.model, images, args.batch_size, bar.update, device)
    with percent_bar("quantizing") as quantizing:
        qmodel = cache.quantized(args.model, config, quantizing)
    result = _score(args, config, loaded, (images, labels, fp_logits), qmodel, device)
    shown = pick_images(paths, fp_logits.argmax(1), result.predictions, args.examples)
    with tqdm(total=len(shown), desc="views", unit="img", file=sys.stderr) as bar:
        pictures = collect_views(cache, args.model, config, shown, progress=bar.update)
    page = report_html(args.model, config, result, args.images, pictures, fold_figure(cache, args.model, config),
                       skipped=len(skipped))
    write_text(args.out, page, "--out")
    print(f"{result.summary()}; logit SQNR {result.logit_sqnr_db:.1f} dB; report: {args.out}")
    return 0


def _calibration(args, config: QuantConfig, preprocess, skipped: dict):
    """The calib-* images `spiq evaluate` draws, so the report shows the model it scores."""
    from tqdm import tqdm

    from spiq.analysis.evaluate import load_calibration

    src = args.calib or args.images
    if not args.calib:
        print(f"note: calibrating on {config.calib_images} images drawn from {src} "
              "(pass --calib DIR for images kept apart from the evaluation)", file=sys.stderr)
    with tqdm(total=config.calib_images, desc="calibration images", unit="img", file=sys.stderr) as bar:
        return load_calibration(src, preprocess, config.calib_images, progress=bar.update,
                                on_skip=skipper(args, skipped))


def _score(args, config: QuantConfig, loaded, data, qmodel, device):
    from tqdm import tqdm

    from spiq.analysis.evaluate import evaluate
    from spiq.models.registry import LoadedModel

    images, labels, fp_logits = data
    with tqdm(total=len(labels), desc=f"evaluating {args.model} {config.method}", unit="img", file=sys.stderr) as bar:
        return evaluate(args.model, images, labels, config, float_model=LoadedModel(loaded.model, loaded.preprocess,
                                                                                    loaded.classes),
                        fp_logits=fp_logits, quantized=qmodel, progress=bar.update, device=device,
                        batch_size=args.batch_size)


def add(sub) -> None:
    r = sub.add_parser("report", help="one offline HTML file: a recipe, its accuracy on a folder, the app's views")
    r.add_argument("--model", required=True, help="a name from `spiq models`")
    r.add_argument("--config", required=True, help="the recipe: QuantConfig JSON (e.g. from the app or spiq advise)")
    r.add_argument("--images", required=True, help="folder of <synset>_*.jpg files or <synset>/ subfolders")
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.add_argument("--limit", type=positive, help="evaluate only the first N images (unreadable ones included)")
    r.add_argument("--examples", type=positive, default=3,
                   help="images shown with the app's views (default 3): flipped ones first")
    r.add_argument("--calib", help="calibration image folder for calib-* and liu-ptq (default: --images)")
    r.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    add_scale_args(r)
    r.set_defaults(func=run)
