"""The `spiq` command: list models, evaluate a method on labelled images, sweep models x methods x
bits, export int8 ONNX, distill the images the bias fit needs ahead of time, advise per-layer
widths under a budget."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from spiq.config import AUTO_BIAS_IMAGES, METHODS, ConfigError, QuantConfig, read_recipe_text
from spiq.models.data import DatasetError, ImageError
from spiq.export.onnx import ExportError, check_exportable
from spiq.core.memory import keep_freed_memory
from spiq.models.registry import ModelUnavailableError, get_spec, list_models

class UsageError(ValueError):
    """A command line that cannot work: an output path that cannot be written, a bad file."""


def _cmd_models(args) -> int:
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


def _build_config(args) -> QuantConfig | None:
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


def _check_output(path: str | None, flag: str, replaced: bool = False) -> None:
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
    _check_output_folder(target.parent, flag, path)


def _check_output_folder(folder: str | Path, flag: str, path: str | None = None) -> None:
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


def _write_json(path: str, data: dict) -> None:
    target, opened = Path(path), False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w") as f:
            opened = True
            f.write(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        if opened and target.is_file():   # cut short (a full disk): half a result must not be read as one
            with contextlib.suppress(OSError):
                target.unlink()
        raise UsageError(f"--json {path} could not be written: {exc.strerror or exc}") from None


def _skipper(args, skipped: dict):
    """The on_skip of the image loaders: None under --strict, else warn once per file and count it."""
    if args.strict:
        return None
    from tqdm import tqdm

    def skip(path, exc):
        if path not in skipped:
            tqdm.write(f"warning: skipped {exc}", file=sys.stderr)   # above the progress bars
        skipped[path] = exc
    return skip


def _cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from spiq.models.data import find_images
    from spiq.analysis.evaluate import evaluate, load_calibration, load_images
    from spiq.models.registry import load_model

    config = _build_config(args)
    _check_output(args.json, "--json")
    loaded = load_model(args.model)
    preprocess = loaded.preprocess
    n = len(find_images(args.images)[: args.limit])
    skipped = {}
    calib = None
    if config is not None and config.needs_calibration:
        src = args.calib or args.images
        if not args.calib:
            print(f"note: calibrating on {config.calib_images} images drawn from {src} "
                  "(pass --calib DIR for images kept apart from the evaluation)", file=sys.stderr)
        with tqdm(total=config.calib_images, desc="calibration images", unit="img", file=sys.stderr) as bar:
            calib = load_calibration(src, preprocess, config.calib_images, progress=bar.update,
                                     on_skip=_skipper(args, skipped))
    with tqdm(total=n, desc="loading images", unit="img", file=sys.stderr) as bar:
        images, labels, _ = load_images(args.images, preprocess, args.limit, progress=bar.update,
                                        on_skip=_skipper(args, skipped))
    passes = 1 if config is None else 2
    with tqdm(total=len(labels) * passes, desc=f"evaluating {args.model} {args.method or config.method}", unit="img",
              file=sys.stderr) as bar, \
            tqdm(total=100, desc="quantizing", unit="%", file=sys.stderr, disable=config is None) as qbar:
        def quantizing(frac, _msg):
            qbar.update(round(frac * 100) - qbar.n)

        result = evaluate(args.model, images, labels, config, calib=calib, float_model=loaded,
                          progress=bar.update, quantize_progress=quantizing)
    if config is None:
        result.wbits = result.abits = None
    print(result.summary())
    if args.json:
        _write_json(args.json, {**result.to_dict(), "n_skipped": len(skipped)})
    return 0


def _cmd_export(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.evaluate import load_calibration, load_images
    from spiq.export.onnx import export_onnx
    from spiq.export.runtime import optimized_op_counts, parity
    from spiq.quantize.api import quantize
    from spiq.models.registry import load_model

    config = _build_config(args)
    if config is not None:
        check_exportable(config)
    _check_output(args.out, "--out", replaced=True)
    _check_output(args.json, "--json")
    n_check = _check_folder(args, config)
    model, preprocess, _ = load_model(args.model)
    calib = None
    skipped = {}
    if config is not None and config.needs_calibration:
        if not args.calib:
            raise ConfigError(f"method {config.method} calibrates on images: give --calib DIR")
        with tqdm(total=config.calib_images, desc="calibration images", unit="img", file=sys.stderr) as bar:
            calib = load_calibration(args.calib, preprocess, config.calib_images, progress=bar.update,
                                     on_skip=_skipper(args, skipped))
    qmodel = model
    size = {"input_size": preprocess.crop}   # a float model's export has no preprocess of its own
    if config is not None:
        with tqdm(total=100, desc=f"quantizing {args.model} {config.method}", unit="%", file=sys.stderr) as bar:
            def progress(frac, _msg):
                bar.update(round(frac * 100) - bar.n)
            qmodel, size = quantize(model, config, calib_data=calib, progress=progress, preprocess=preprocess), {}
    try:
        report = export_onnx(qmodel, args.out, batch=args.batch, **size)
    except OSError as exc:   # export_onnx leaves nothing behind
        raise UsageError(f"--out {args.out} could not be written: {exc.strerror or exc}") from None
    print(report.summary())
    ops = optimized_op_counts(args.out)
    print("ONNX Runtime runs: " + ", ".join(f"{n} {c}" for n, c in sorted(ops.items(), key=lambda kv: -kv[1])))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    result = {"model": args.model, "config": None if config is None else config.to_dict(), "out": args.out,
              "int8_layers": len(report.int8_layers), "mul_layers": report.mul_layers,
              "requantized": report.requantized, "extra_quantizers": report.extra_quantizers,
              "onnx_ops": report.op_counts, "ort_ops": ops}
    if args.check:
        with tqdm(total=n_check, desc="loading images", unit="img", file=sys.stderr) as bar:
            images, labels, _ = load_images(args.check, preprocess, args.limit, progress=bar.update,
                                            on_skip=_skipper(args, skipped))
        par = parity(qmodel, args.out, images, labels)
        print(par.summary())
        result["parity"] = vars(par)
    if args.json:
        _write_json(args.json, {**result, "n_skipped": len(skipped)})
    return 0


def _check_folder(args, config) -> int:
    """How many images `export --check` will read, checked before any work."""
    if not args.check:
        return 0
    if config is None:
        raise ConfigError("--check compares the int8 model with its simulation: give a quantization method")
    from spiq.models.data import find_images

    return len(find_images(args.check)[: args.limit])


def _cmd_distill(args) -> int:
    from tqdm import tqdm

    from spiq.quantize.distill import distilled_images, has_batchnorm, image_key, to_pixels, write_pixels
    from spiq.quantize.prepared import distill_bounds
    from spiq.models.registry import load_model

    if not 1 <= args.images <= 256:
        raise ConfigError(f"--images must be from 1 to 256, got {args.images}")
    if args.out:
        _check_output_folder(args.out, "--out")
    model, preprocess, _ = load_model(args.model)
    if not has_batchnorm(model):
        raise ConfigError(f"{args.model} has no BatchNorm statistics to distill images from")
    lo, hi, size = distill_bounds(preprocess)
    with tqdm(total=100, desc=f"distilling {args.images} images from {args.model}", unit="%", file=sys.stderr) as bar:
        def progress(frac, _msg):
            bar.update(round(frac * 100) - bar.n)
        images = distilled_images(model, args.images, lo, hi, size, progress=progress)
        bar.update(100 - bar.n)
    if args.out:
        folder = Path(args.out) / image_key(model, args.images, lo, hi, size)
        write_pixels(folder, to_pixels(images, lo, hi))
        print(f"wrote {folder}")
    else:
        print(f"{args.images} images for {args.model} are in the cache")
    return 0


def _cmd_sweep(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.sweep import Sweep, merge, mark_pareto, run_sweep, write_csv
    from spiq.analysis.sweep_report import write_report

    base = QuantConfig.from_json(read_recipe_text(args.config, f"--config {args.config}")) if args.config else QuantConfig()
    if args.calib_n is not None:
        base = base.replace(calib_images=args.calib_n)
    cells, n_images = _sweep_cells(args, base)
    _check_output_folder(args.out, "--out")
    sweep = Sweep(args.images, Path(args.out), base, args.limit, args.calib, args.strict)
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
                             on_skip=_skipper(args, skipped),
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
    from spiq.models.data import find_images

    _sweep_configs(args, base)
    for model in args.model:
        get_spec(model)   # an unknown name: KeyError with the close ones
    n_images = len(find_images(args.images)[: args.limit])   # a missing or empty folder, before any work
    if args.calib:
        find_images(args.calib)
    return plan_cells(args.model, args.methods, args.wbits, args.abits), n_images


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _bit_list(text: str) -> list[int]:
    return [_bits(t) for t in _names(text)]


def _cmd_advise(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.advise import advise, check_budget, check_widths
    from spiq.analysis.sensitivity import sensitivity
    from spiq.models.registry import load_model

    config = _build_config(args)
    if config is None:
        raise ConfigError("advise chooses quantized widths: give a quantization method, not fp")
    widths = check_widths(args.widths)
    check_budget(args.budget, widths)
    if args.weight_budget is not None:
        check_budget(args.weight_budget, widths, "--weight-budget")
    _check_output(args.out, "--out")
    _check_output(args.json, "--json")
    loaded = load_model(args.model)   # unknown model: one line, before any work
    with tqdm(total=100, desc=f"sensitivity of {args.model} on distilled images", unit="%", file=sys.stderr) as bar:
        def progress(frac, _msg):
            bar.update(round(frac * 100) - bar.n)
        table = sensitivity(loaded, config, widths, progress=progress)
    advice = advise(table, config, args.budget, widths, args.weight_budget)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(advice.config.to_json() + "\n")
    except OSError as exc:
        raise UsageError(f"--out {args.out} could not be written: {exc.strerror or exc}") from None
    print(f"advised {args.model}: average input width {advice.input_budget_used:.3f} bits (budget {args.budget}), "
          f"weights {advice.weight_budget_used:.3f}, predicted logit SQNR {advice.predicted_sqnr_db:.1f} dB "
          f"on distilled images; recipe {args.out}")
    if args.json:
        _write_json(args.json, {"model": args.model, "budget": args.budget, "weight_budget": args.weight_budget,
                                "widths": widths, **advice.to_dict()})
    return 0


def _widths(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None


def _bits(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 16, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, as every other error of spiq: `usage` would bury it under the whole synopsis
        self.exit(2, f"spiq: error: {message} (see {self.prog} --help)\n")


def _add_sweep(sub) -> None:
    s = sub.add_parser("sweep", help="models x methods x bits on labelled images: one JSON per cell, a CSV, an HTML report")
    s.add_argument("--model", required=True, type=_names, help="a name from `spiq models`, or a comma list")
    s.add_argument("--images", required=True, help="folder of <synset>_*.jpg files or <synset>/ subfolders")
    s.add_argument("--methods", required=True, type=_names, help="comma list of methods, e.g. spiq,static-tensor")
    s.add_argument("--wbits", required=True, type=_bit_list, help="comma list of weight bits (2-16), e.g. 8,4")
    s.add_argument("--abits", required=True, type=_bit_list, help="comma list of input bits (2-16), e.g. 8,6,4")
    s.add_argument("--limit", type=_positive, help="evaluate only the first N images (unreadable ones included)")
    s.add_argument("--config", help="QuantConfig JSON every cell starts from; the cells set method and bits")
    s.add_argument("--calib", help="calibration image folder for calib-* and liu-ptq (default: --images)")
    s.add_argument("--calib-n", type=_positive, help="number of calibration images")
    s.add_argument("--out", required=True, help="folder: cells/ (one JSON per cell), cache/, sweep.csv, report.html")
    s.add_argument("--jobs", type=_positive, default=1, help="cells computed in this many processes (default 1)")
    s.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    s.set_defaults(func=_cmd_sweep)


def _add_advise(sub) -> None:
    a = sub.add_parser("advise", help="per-layer widths under an average-bits budget, from distilled images only")
    a.add_argument("--model", required=True, help="a name from `spiq models`")
    a.add_argument("--method", choices=list(METHODS), help="the quantization method (or --config)")
    a.add_argument("--wbits", type=_bits, help="weight bits (2-16): every layer's without --weight-budget")
    a.add_argument("--abits", type=_bits, help="the recipe's model-wide input bits; layers that differ are overrides")
    a.add_argument("--config", help="QuantConfig JSON to start from; --method/--wbits/--abits override its fields")
    a.add_argument("--budget", type=float, required=True,
                   help="average input bits, weighted by each layer's input values per image")
    a.add_argument("--weight-budget", type=float, help="also choose weight widths: average bits by weight count")
    a.add_argument("--widths", type=_widths, default=[4, 5, 6, 8], help="widths to choose from (default 4,5,6,8)")
    a.add_argument("--out", required=True, help="the recipe JSON to write (for evaluate/export --config)")
    a.add_argument("--json", help="write the budget used and the predicted logit SQNR as JSON here")
    a.set_defaults(func=_cmd_advise, calib_n=None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spiq", description="Data-free post-training quantization of vision networks.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models and whether they work offline").set_defaults(func=_cmd_models)

    e = sub.add_parser("evaluate", help="top-1 and agreement with the float model on labelled images")
    e.add_argument("--model", required=True, help="a name from `spiq models`")
    e.add_argument("--images", required=True, help="folder of <synset>_*.jpg files or <synset>/ subfolders")
    e.add_argument("--method", choices=["fp", *METHODS], help="fp (float) or a quantization method")
    e.add_argument("--wbits", type=_bits, help="weight bits (2-16)")
    e.add_argument("--abits", type=_bits, help="input (activation) bits (2-16)")
    e.add_argument("--limit", type=_positive, help="evaluate only the first N images (unreadable ones included)")
    e.add_argument("--config", help="QuantConfig JSON; --method/--wbits/--abits override its fields")
    e.add_argument("--calib", help="calibration image folder for calib-* and liu-ptq (default: --images)")
    e.add_argument("--calib-n", type=_positive, help="number of calibration images")
    e.add_argument("--mixed-precision", type=float, metavar="BITS",
                   help="liu-ptq: average bits over the attention and MLP modules, one width per module")
    e.add_argument("--json", help="write the result as JSON here (n_skipped: unreadable images left out)")
    e.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    e.set_defaults(func=_cmd_evaluate)

    x = sub.add_parser("export", help="write the quantized model as an int8 ONNX graph for ONNX Runtime")
    x.add_argument("--model", required=True, help="a name from `spiq models`")
    x.add_argument("--method", choices=["fp", *METHODS], help="fp (a float graph) or a static quantization method")
    x.add_argument("--wbits", type=_bits, help="weight bits (2-8)")
    x.add_argument("--abits", type=_bits, help="input (activation) bits (8: the int8 kernels take uint8)")
    x.add_argument("--config", help="QuantConfig JSON; --method/--wbits/--abits override its fields")
    x.add_argument("--calib", help="calibration image folder (calib-* methods)")
    x.add_argument("--calib-n", type=_positive, help="number of calibration images")
    x.add_argument("--out", required=True, help="the .onnx file to write (written whole or not at all)")
    x.add_argument("--batch", type=_positive, help="fix the batch size (default: symbolic)")
    x.add_argument("--check", help="labelled image folder: compare ONNX Runtime with the simulation on it")
    x.add_argument("--limit", type=_positive, help="with --check: only the first N images")
    x.add_argument("--json", help="write what was exported (and the check) as JSON here")
    x.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    x.set_defaults(func=_cmd_export)

    _add_sweep(sub)
    _add_advise(sub)

    d = sub.add_parser("distill", help="distill the images the bias fit (bias_images) needs, once per model")
    d.add_argument("--model", required=True, help="a name from `spiq models`")
    d.add_argument("--images", type=int, default=AUTO_BIAS_IMAGES,
                   help=f"how many images (default {AUTO_BIAS_IMAGES}: what bias_images=null uses)")
    d.add_argument("--out", help="also write them to this folder (as spiq/distilled/ ships them)")
    d.set_defaults(func=_cmd_distill)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except (ConfigError, DatasetError, ImageError, UsageError, ModelUnavailableError, ExportError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"spiq: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
