"""What every verb of the `spiq` command shares: the recipe from flags, checks of output paths made
before any work, argument types, progress bars."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from spiq.core.errors import SpiqError
from spiq.config import ConfigError, QuantConfig, read_recipe_text


IMAGES_HELP = ("labelled folder: <synset>_*.jpg files, <synset>/ subfolders, ILSVRC2012_val_*.JPEG with "
               "LOC_val_solution.csv, or ILSVRC2012_devkit_t12.tar.gz + ILSVRC2012_img_val.tar (docs/cli.md)")


class UsageError(SpiqError, ValueError):
    """A command line that cannot work: an output path that cannot be written, a bad file."""


def build_config(args) -> QuantConfig | None:
    """The recipe of --config with --method/--wbits/--abits/--calib-n over it; None for fp."""
    if args.config:
        base = QuantConfig.from_json(read_recipe_text(args.config, f"--config {args.config}"))
    else:
        base = QuantConfig()
        if args.method is None:
            raise ConfigError("give --method (or --config)")
    method = args.method or base.method
    if method == "fp":
        return None
    changes = {"method": method}
    if args.wbits is not None:
        changes["weight_bits"] = args.wbits
    if args.abits is not None:
        changes["input_bits"] = args.abits
    if args.calib_n is not None:
        changes["calib_images"] = args.calib_n
    if getattr(args, "mixed_precision", None) is not None:
        changes["mixed_precision"] = args.mixed_precision
    return base.replace(**changes)


def check_output(path: str | None, flag: str, replaced: bool = False) -> None:
    """Refuse an output file that cannot be written, before the work whose result it is to hold.

    `replaced`: the file is written beside its place and moved there, so its folder must take new
    files even when the file exists.
    """
    if path is None:
        return
    target = Path(path)
    try:
        if target.is_dir():
            raise UsageError(f"{flag} {path} is a directory; give a file path")
        if replaced and target.exists() and not target.is_file():   # os.replace would swap out a device
            raise UsageError(f"{flag} {path} exists and is not a regular file")
        if target.exists() and not replaced:
            if not os.access(target, os.W_OK):
                raise UsageError(f"{flag} {path} is not writable")
            return
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None
    check_output_folder(target.parent, flag, path)


def check_output_folder(folder: str | Path, flag: str, path: str | None = None) -> None:
    """Refuse unless `folder` is, or can be made, a folder that takes new files: create one and remove it."""
    path = path or str(folder)
    folder = Path(folder)
    try:
        while not folder.exists():   # created at the end, inside the nearest folder that exists
            folder = folder.parent
        if not folder.is_dir():
            raise UsageError(f"{flag} {path}: {folder} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".spiq-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None


def write_text(path: str, text: str, flag: str) -> None:
    """Write `text` to `path`; a file cut short (a full disk) is removed: half a result must not be read as one."""
    target, opened = Path(path), False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w") as f:
            opened = True
            f.write(text)
    except OSError as exc:
        if opened and target.is_file():
            with contextlib.suppress(OSError):
                target.unlink()
        raise UsageError(f"{flag} {path} could not be written: {exc.strerror or exc}") from None


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n", "--json")


def skipper(args, skipped: dict):
    """The on_skip of the image loaders: None under --strict, else warn once per file and count it."""
    if args.strict:
        return None
    from tqdm import tqdm

    def skip(path, exc):
        if path not in skipped:
            tqdm.write(f"warning: skipped {exc}", file=sys.stderr)   # above the progress bars
        skipped[path] = exc
    return skip


@contextlib.contextmanager
def percent_bar(desc: str, disable: bool = False):
    """A tqdm bar in percent, yielding the `progress(frac, message)` callback the library takes."""
    from tqdm import tqdm

    with tqdm(total=100, desc=desc, unit="%", file=sys.stderr, disable=disable) as bar:
        def progress(frac, _msg=None):
            bar.update(round(frac * 100) - bar.n)
        yield progress


def names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def bits(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 16, got {text!r}") from None


def bit_list(text: str) -> list[int]:
    return [bits(t) for t in names(text)]


def widths(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def count(text: str) -> int:
    """A whole number, 0 allowed (--workers 0: decode in this process)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number (0 or more), got {text!r}")
    return value


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """--device, --batch-size, --workers: where and how many images at a time a verb evaluates."""
    from spiq.core.devices import BATCH_SIZE, DEVICES

    parser.add_argument("--device", default="auto", metavar="|".join(DEVICES),
                        help="where the models run: auto (a CUDA GPU when torch sees one, else the CPU), cpu, "
                             "cuda or cuda:N (default auto); quantizing itself runs on the CPU")
    parser.add_argument("--batch-size", type=positive, default=BATCH_SIZE,
                        help=f"images per forward pass (default {BATCH_SIZE})")
    parser.add_argument("--workers", type=count, default=0,
                        help="DataLoader processes that decode images while the models run (default 0: this one)")


def scale_device(args):
    """The torch device of --device, or a one-line error naming the flag before any work."""
    from spiq.core.devices import resolve_device

    return resolve_device(args.device, "--device")
