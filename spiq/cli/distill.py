"""`spiq distill`: the images the bias fit needs, distilled from a model's BatchNorm statistics ahead of time."""
from __future__ import annotations

from pathlib import Path

from spiq.cli.common import check_output_folder, percent_bar
from spiq.config import AUTO_BIAS_IMAGES, ConfigError


def run_distill(args) -> int:
    from spiq.quantize.distill import distilled_images, has_batchnorm, image_key, to_pixels, write_pixels
    from spiq.quantize.prepared import distill_bounds
    from spiq.models.registry import load_model

    if not 1 <= args.images <= 256:
        raise ConfigError(f"--images must be from 1 to 256, got {args.images}")
    if args.out:
        check_output_folder(args.out, "--out")
    model, preprocess, _ = load_model(args.model)
    if not has_batchnorm(model):
        raise ConfigError(f"{args.model} has no BatchNorm statistics to distill images from")
    lo, hi, size = distill_bounds(preprocess)
    with percent_bar(f"distilling {args.images} images from {args.model}") as progress:
        images = distilled_images(model, args.images, lo, hi, size, progress=progress)
        progress(1.0)
    if args.out:
        folder = Path(args.out) / image_key(model, args.images, lo, hi, size)
        write_pixels(folder, to_pixels(images, lo, hi))
        print(f"wrote {folder}")
    else:
        print(f"{args.images} images for {args.model} are in the cache")
    return 0


def add(sub) -> None:
    d = sub.add_parser("distill", help="distill the images the bias fit (bias_images) needs, once per model")
    d.add_argument("--model", required=True, help="a name from `spiq models`")
    d.add_argument("--images", type=int, default=AUTO_BIAS_IMAGES,
                   help=f"how many images (default {AUTO_BIAS_IMAGES}: what bias_images=null uses)")
    d.add_argument("--out", help="also write them to this folder (as spiq/distilled/ ships them)")
    d.set_defaults(func=run_distill)
