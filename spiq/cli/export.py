"""`spiq export`: the quantized model as an int8 ONNX graph, optionally checked against its simulation."""
from __future__ import annotations

import sys

from spiq.cli.common import (UsageError, bits, build_config, check_output, percent_bar, positive, skipper,
                             write_json)
from spiq.config import METHODS, ConfigError
from spiq.export.onnx import check_exportable


def run_export(args) -> int:
    from tqdm import tqdm

    from spiq.analysis.evaluate import load_calibration
    from spiq.export.onnx import export_onnx
    from spiq.export.runtime import optimized_op_counts
    from spiq.quantize.api import quantize
    from spiq.models.registry import load_model

    config = build_config(args)
    if config is not None:
        check_exportable(config)
    check_output(args.out, "--out", replaced=True)
    check_output(args.json, "--json")
    n_check = _check_folder(args, config)
    model, preprocess, _ = load_model(args.model)
    calib = None
    skipped = {}
    if config is not None and config.needs_calibration:
        if not args.calib:
            raise ConfigError(f"method {config.method} calibrates on images: give --calib DIR")
        with tqdm(total=config.calib_images, desc="calibration images", unit="img", file=sys.stderr) as bar:
            calib = load_calibration(args.calib, preprocess, config.calib_images, progress=bar.update,
                                     on_skip=skipper(args, skipped))
    qmodel = model
    size = {"input_size": preprocess.crop}   # a float model's export has no preprocess of its own
    if config is not None:
        with percent_bar(f"quantizing {args.model} {config.method}") as progress:
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
        result["parity"] = _parity(args, qmodel, preprocess, n_check, skipped)
    if args.json:
        write_json(args.json, {**result, "n_skipped": len(skipped)})
    return 0


def _parity(args, qmodel, preprocess, n_check: int, skipped: dict) -> dict:
    from tqdm import tqdm

    from spiq.analysis.evaluate import load_images
    from spiq.export.runtime import parity

    with tqdm(total=n_check, desc="loading images", unit="img", file=sys.stderr) as bar:
        images, labels, _ = load_images(args.check, preprocess, args.limit, progress=bar.update,
                                        on_skip=skipper(args, skipped))
    par = parity(qmodel, args.out, images, labels)
    print(par.summary())
    return vars(par)


def _check_folder(args, config) -> int:
    """How many images `export --check` will read, checked before any work."""
    if not args.check:
        return 0
    if config is None:
        raise ConfigError("--check compares the int8 model with its simulation: give a quantization method")
    from spiq.models.folders import find_images

    return len(find_images(args.check)[: args.limit])


def add(sub) -> None:
    x = sub.add_parser("export", help="write the quantized model as an int8 ONNX graph for ONNX Runtime")
    x.add_argument("--model", required=True, help="a name from `spiq models`")
    x.add_argument("--method", choices=["fp", *METHODS], help="fp (a float graph) or a static quantization method")
    x.add_argument("--wbits", type=bits, help="weight bits (2-8)")
    x.add_argument("--abits", type=bits, help="input (activation) bits (8: the int8 kernels take uint8)")
    x.add_argument("--config", help="QuantConfig JSON; --method/--wbits/--abits override its fields")
    x.add_argument("--calib", help="calibration image folder (calib-* methods)")
    x.add_argument("--calib-n", type=positive, help="number of calibration images")
    x.add_argument("--out", required=True, help="the .onnx file to write (written whole or not at all)")
    x.add_argument("--batch", type=positive, help="fix the batch size (default: symbolic)")
    x.add_argument("--check", help="labelled image folder: compare ONNX Runtime with the simulation on it")
    x.add_argument("--limit", type=positive, help="with --check: only the first N images")
    x.add_argument("--json", help="write what was exported (and the check) as JSON here")
    x.add_argument("--strict", action="store_true", help="refuse an unreadable image instead of skipping it")
    x.set_defaults(func=run_export)
