"""`spiq distill`: the images the bias fit needs, distilled from a model's BatchNorm statistics ahead of time."""
from __future__ import annotations

import sys
from pathlib import Path

from spiq.cli.common import check_output_folder, percent_bar
from spiq.config import AUTO_BIAS_IMAGES, ConfigError


def run_distill(args) -> int:
    if not 1 <= args.images <= 256:
        raise ConfigError(f"--images must be from 1 to 256, got {args.images}")
    if (args.model is None) == (not args.all):
        raise ConfigError("give --model NAME or --all")
    if args.out:
        check_output_folder(args.out, "--out")
    if not args.all:
        _distill(args.model, args.images, args.out)
        return 0
    return _distill_all(args.images, args.out)


def _distill_all(n: int, out: str | None) -> int:
    """Every model that can be loaded here and has BatchNorm statistics; the others are listed."""
    from spiq.models.registry import ModelUnavailableError, list_models, loadable

    failed = 0
    for name in list_models():
        problem = loadable(name)
        if problem is not None:
            print(f"{name}: skipped, cannot be loaded here ({problem})", file=sys.stderr)
            continue
        try:
            _distill(name, n, out)
        except ConfigError as exc:   # no BatchNorm: nothing to distill from
            print(f"{name}: skipped, {exc}", file=sys.stderr)
        except ModelUnavailableError as exc:
            print(f"{name}: failed, {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _distill(name: str, n: int, out: str | None) -> None:
    from spiq.quantize.distill import distilled_images, has_batchnorm, image_key, to_pixels, write_pixels
    from spiq.quantize.memo import distill_bounds
    from spiq.models.registry import load_model

    model, preprocess, _ = load_model(name)
    if not has_batchnorm(model):
        raise ConfigError(f"{name} has no BatchNorm statistics to distill images from")
    lo, hi, size = distill_bounds(preprocess)
    with percent_bar(f"distilling {n} images from {name}") as progress:
        images = distilled_images(model, n, lo, hi, size, progress=progress)
        progress(1.0)
    if out:
        folder = Path(out) / image_key(model, n, lo, hi, size)
        write_pixels(folder, to_pixels(images, lo, hi))
        print(f"{name}: wrote {folder}")
    else:
        print(f"{name}: {n} images are in the cache")


def add(sub) -> None:
    d = sub.add_parser("distill", help="distill the images the bias fit (bias_images) needs, once per model")
    d.add_argument("--model", help="a name from `spiq models`")
    d.add_argument("--all", action="store_true", help="every model that can be loaded here and has BatchNorm")
    d.add_argument("--images", type=int, default=AUTO_BIAS_IMAGES,
                   help=f"how many images (default {AUTO_BIAS_IMAGES}: what bias_images=null uses)")
    d.add_argument("--out", help="also write them to this folder (as spiq/distilled/ ships them)")
    d.set_defaults(func=run_distill)
