import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _spiq(*args):
    return subprocess.run([sys.executable, "-m", "spiq", *args], capture_output=True, text=True, timeout=600)


def test_models_lists_the_embedded_lites_as_available_offline(capsys):
    from conftest import LITES
    from spiq import cli

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for name, size in LITES.items():
        assert lines[name].split()[1] == "yes", lines[name]
        assert f"{size}x{size}" in lines[name] and "EfficientNet-Lite" in lines[name]


def test_evaluate_writes_the_json_contract(tmp_path, sample_dir):
    out = tmp_path / "r.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--method", "spiq",
              "--wbits", "8", "--abits", "6", "--limit", "24", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "agreement" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert "it/s" in r.stderr or "img/s" in r.stderr or "s/img" in r.stderr  # a progress bar ran
    data = json.loads(out.read_text())
    assert set(data) == {"model", "method", "wbits", "abits", "n_images", "top1", "top1_fp", "agreement", "seconds",
                         "n_skipped"}
    assert data["n_skipped"] == 0
    assert data["model"] == "efficientnet_lite0" and data["method"] == "spiq"
    assert (data["wbits"], data["abits"], data["n_images"]) == (8, 6, 24)
    assert 0.5 <= data["top1_fp"] <= 1 and 0.8 <= data["agreement"] <= 1 and data["seconds"] > 0


def test_evaluate_fp_and_config_file(tmp_path, sample_dir):
    out = tmp_path / "fp.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--method", "fp",
              "--limit", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["agreement"] == 1.0 and data["top1"] == data["top1_fp"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method": "static-tensor", "weight_bits": 8, "input_bits": 8,
                               "overrides": {"conv_stem": {"skip": True}}}))
    out2 = tmp_path / "c_out.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--config", str(cfg),
              "--limit", "8", "--json", str(out2))
    assert r.returncode == 0, r.stderr
    assert json.loads(out2.read_text())["method"] == "static-tensor"


def test_evaluate_bad_input_is_a_clear_error(tmp_path, sample_dir):
    base = ["evaluate", "--model", "efficientnet_lite0", "--method", "spiq", "--wbits", "8", "--abits", "8"]
    r = _spiq(*base, "--images", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _spiq(*base, "--images", str(tmp_path))
    assert r.returncode == 2 and "holds no images" in r.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.jpg")
    r = _spiq(*base, "--images", str(tmp_path))
    assert r.returncode == 2 and "no ImageNet synset" in r.stderr
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--method", "spiq",
              "--wbits", "8", "--abits", "1")
    assert r.returncode == 2 and "input_bits must be from 2 to 16" in r.stderr
    r = _spiq("evaluate", "--model", "resnet_18", "--images", str(sample_dir), "--method", "fp")
    assert r.returncode == 2 and "unknown model 'resnet_18'" in r.stderr and "resnet18" in r.stderr


def test_evaluate_liu_ptq_on_a_transformer_with_calibration_folder(tmp_path, register, capsys, sample_dir):
    from spiq import cli
    from spiq.models import registry
    from spiq.models.vit import toy_vit

    pre = toy_vit()[1]
    register(registry.ModelSpec("toy_vit", "random weights (tests)", lambda: toy_vit()[0], lambda: None, pre, "toy ViT",
                                ("vit",)))
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted(sample_dir.iterdir())[-6:]:   # images kept apart from the 8 evaluated
        (calib / f.name).symlink_to(f)
    out = tmp_path / "r.json"
    rc = cli.main(["evaluate", "--model", "toy_vit", "--images", str(sample_dir), "--limit", "8", "--method", "liu-ptq",
                   "--wbits", "6", "--abits", "6", "--calib", str(calib), "--calib-n", "4", "--mixed-precision", "6",
                   "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert (data["method"], data["wbits"], data["abits"], data["n_images"]) == ("liu-ptq", 6, 6, 8)
    assert "4/4" in err and "quantizing" in err     # four calibration images decoded, the search's progress shown
    rc = cli.main(["evaluate", "--model", "toy_vit", "--images", str(sample_dir), "--limit", "8", "--method", "liu-ptq",
                   "--calib", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--limit", "8",
                   "--method", "liu-ptq", "--calib", str(calib)])
    assert rc == 2 and "vision transformers" in capsys.readouterr().err


def test_distill_writes_the_shipped_form_and_refuses_what_it_cannot_do(tmp_path, monkeypatch, register, capsys):
    import torch

    from spiq import cli

    from spiq.quantize import distill

    from spiq.models import registry
    from spiq.models.vit import toy_vit

    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ship"
    assert cli.main(["distill", "--model", "efficientnet_lite0", "--out", str(out)]) == 0, capsys.readouterr().err
    (written,) = out.iterdir()
    shipped = distill.SHIPPED / written.name   # the package's own images, found by the same key
    assert torch.equal(distill.read_pixels(written, 8, 224), distill.read_pixels(shipped, 8, 224))
    assert not (tmp_path / "cache").exists()   # read from the package, not distilled into the cache
    assert cli.main(["distill", "--model", "efficientnet_lite0", "--images", "0"]) == 2
    assert "--images must be from 1 to 256" in capsys.readouterr().err
    register(registry.ModelSpec("toy_vit", "random weights (tests)", lambda: toy_vit()[0], lambda: None, toy_vit()[1],
                                "toy ViT", ("vit",)))
    assert cli.main(["distill", "--model", "toy_vit"]) == 2
    assert "no BatchNorm" in capsys.readouterr().err


def test_distill_all_prepares_every_loadable_model_with_batchnorm(tmp_path, monkeypatch, register, capsys):
    from spiq import cli
    from spiq.models import registry
    from spiq.models.toy import toy_cnn
    from spiq.models.vit import toy_vit
    from spiq.quantize import distill
    from spiq.quantize.distill import find_distilled
    from spiq.quantize.memo import distill_bounds

    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path / "cache"))
    register(registry.get_spec("efficientnet_lite0"),
             registry.ModelSpec("toy_cnn", "random weights (tests)", lambda: toy_cnn()[0], lambda: None, toy_cnn()[1],
                                "toy CNN", ("cnn",)),
             registry.ModelSpec("toy_vit", "random weights (tests)", lambda: toy_vit()[0], lambda: None, toy_vit()[1],
                                "toy ViT", ("vit",)),
             registry.ModelSpec("far_away", "nowhere", lambda: None, lambda: "weights not cached", toy_vit()[1],
                                "a model to download", ("cnn",),
                                download_problem=lambda: "the weights' host is unreachable"),
             only=True)
    steps = distill.distill_images   # a few steps of the real optimisation: the test is of what gets made

    monkeypatch.setattr(distill, "distill_images", lambda *a, progress=None: steps(*a[:5], steps=3, progress=progress))
    model, pre = toy_cnn()
    assert find_distilled(model, 8, *distill_bounds(pre)) is None
    assert cli.main(["distill", "--all"]) == 0   # 8 images: what ships for the Lites
    out, err = capsys.readouterr()
    assert "efficientnet_lite0: 8 images are in the cache" in out and "toy_cnn: 8 images are in the cache" in out
    assert "toy_vit: skipped, toy_vit has no BatchNorm" in err
    assert "far_away: skipped, cannot be loaded here (weights not cached; the weights' host is unreachable)" in err
    assert find_distilled(model, 8, *distill_bounds(pre)) is not None   # the app's bias fit finds them
    assert cli.main(["distill", "--all", "--model", "toy_cnn"]) == 2
    assert "give --model NAME or --all" in capsys.readouterr().err


# The shipped example photos under the synset names of what they show.
EXAMPLES = {"n02123159_tiger_cat.jpg": "cat.jpg", "n07920052_espresso.jpg": "coffee.jpg",
            "n04266014_space_shuttle.jpg": "rocket.jpg", "n03976467_polaroid_camera.jpg": "camera.jpg"}


def _folder_with_bad_images(tmp_path):
    """Three real photos, a text file named like an image, and a real JPEG cut short."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, asset in EXAMPLES.items():
        shutil.copy(ROOT / "assets" / asset, folder / name)
    cut = "n03976467_polaroid_camera.jpg"
    (folder / "n01440764_x.jpg").write_text("not a picture")
    (folder / cut).write_bytes((folder / cut).read_bytes()[:3000])
    return folder, cut


def _one_error_line(err: str) -> str:
    """The error of a refused command: its last line, the only one saying `error`, no traceback."""
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("spiq: error: ") and err.rstrip().endswith(line)
    return line


@pytest.mark.slow   # a heavy end-to-end job
def test_a_bad_image_in_a_folder_is_skipped_with_a_warning_or_refused_under_strict(tmp_path, capsys):
    from spiq import cli

    folder, cut = _folder_with_bad_images(tmp_path)
    out = tmp_path / "r.json"
    base = ["evaluate", "--model", "efficientnet_lite0", "--images", str(folder), "--method", "fp"]
    r = _spiq(*base, "--json", str(out))
    assert r.returncode == 0, r.stderr
    skipped = re.findall(r"^warning: skipped (.+?): (.+)$", r.stderr, re.MULTILINE)
    assert sorted(os.path.basename(p) for p, _ in skipped) == sorted(["n01440764_x.jpg", cut])
    data = json.loads(out.read_text())
    assert (data["n_images"], data["n_skipped"]) == (3, 2)

    assert cli.main([*base, "--strict"]) == 2
    assert "n01440764_x.jpg: not an image" in _one_error_line(capsys.readouterr().err)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(folder / cut, only_bad / cut)
    assert cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(only_bad), "--method", "fp"]) == 2
    assert "none of its images could be read" in _one_error_line(capsys.readouterr().err)


def test_the_loaders_skip_bad_images_only_when_asked(tmp_path):
    from spiq.models.data import ImageError, Preprocess
    from spiq.analysis.evaluate import load_calibration, load_images

    folder, cut = _folder_with_bad_images(tmp_path)
    pre = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ImageError, match="n01440764_x.jpg: not an image"):
        load_images(folder, pre)
    skipped = {}
    images, labels, paths = load_images(folder, pre, on_skip=skipped.__setitem__)
    assert images.shape == (3, 3, 32, 32) and len(labels) == 3 and len(paths) == 3
    assert sorted(p.name for p in skipped) == sorted(["n01440764_x.jpg", cut]) and not set(skipped) & set(paths)
    # calibration draws another image for each bad one: all three good ones for four asked
    assert len(load_calibration(folder, pre, 4, on_skip=lambda p, e: None)) == 3
    assert len(load_calibration(folder, pre, 2, on_skip=lambda p, e: None)) == 2


@pytest.mark.parametrize("args", [["evaluate", "--limit", "0"], ["evaluate", "--limit", "-1"],
                                  ["evaluate", "--calib-n", "0"], ["export", "--out", "m.onnx", "--batch", "0"],
                                  ["export", "--out", "m.onnx", "--limit", "-3"]])
def test_counts_must_be_positive(args, tmp_path, capsys):
    from spiq import cli

    command, flag = args[0], args[-2]
    rest = ["--images", str(tmp_path)] if command == "evaluate" else []
    with pytest.raises(SystemExit) as exit_:   # at parsing, before anything else is looked at
        cli.main([*args, "--model", "efficientnet_lite0", "--config", str(tmp_path / "missing.json"), *rest])
    line = _one_error_line(capsys.readouterr().err)
    assert exit_.value.code == 2 and f"argument {flag}: must be a positive integer" in line


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, sample_dir):
    from spiq import cli

    (tmp_path / "file.txt").write_text("x")
    evaluate = ["evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--limit", "2",
                "--method", "fp"]
    for bad, why in [(tmp_path, "is a directory"), (tmp_path / "file.txt" / "r.json", "file.txt is not a directory"),
                     (tmp_path / "file.txt" / "sub" / "r.json", "file.txt is not a directory")]:
        assert cli.main([*evaluate, "--json", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"--json {bad}" in _one_error_line(err) and why in err and "evaluating" not in err
    export = ["export", "--model", "efficientnet_lite0", "--method", "spiq"]
    assert cli.main([*export, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a directory" in _one_error_line(err) and "quantizing" not in err
    assert cli.main([*export, "--out", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "file.txt" / "r")]) == 2
    err = capsys.readouterr().err
    assert "--json" in _one_error_line(err) and "quantizing" not in err and not (tmp_path / "m.onnx").exists()
    assert cli.main(["distill", "--model", "efficientnet_lite0", "--out", str(tmp_path / "file.txt")]) == 2
    err = capsys.readouterr().err
    assert "file.txt is not a directory" in _one_error_line(err) and "distilling" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_folder_is_refused_before_any_work(tmp_path, capsys, sample_dir):
    from spiq import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--limit", "2",
                     "--method", "fp", "--json", str(locked / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written: Permission denied" in _one_error_line(err) and "evaluating" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_json_write_that_fails_at_the_end_is_one_line(capsys, sample_dir):
    from spiq import cli

    assert cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--limit", "2",
                     "--method", "fp", "--json", "/dev/full"]) == 2
    assert "--json /dev/full could not be written: No space left" in _one_error_line(capsys.readouterr().err)


def test_config_files_that_are_not_small_utf8_json_are_refused(tmp_path, capsys, sample_dir):
    from spiq import cli

    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"method": "spiq", "note": "caf\u00e9"}'.encode("latin-1"))
    big = tmp_path / "big.json"
    big.write_text('{"method": "spiq"' + " " * 1_100_000 + "}")
    for path, why in [(nested, "nested"), (latin, f"--config {latin} is not UTF-8 text"),
                      (big, f"--config {big} has 1100018 bytes")]:
        rc = cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--config", str(path)])
        assert rc == 2 and why in _one_error_line(capsys.readouterr().err)


def test_export_refuses_a_recipe_without_int8_graph_before_quantizing(tmp_path, capsys):
    from spiq import QuantConfig
    from spiq import cli
    from spiq.export.onnx import ExportError, check_exportable

    base = ["export", "--model", "efficientnet_lite0", "--out", str(tmp_path / "m.onnx")]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method": "spiq", "overrides": {"blocks.1.0.conv_pw": {"input_bits": 6}}}))
    for args, why in [(["--method", "spiq", "--abits", "4"], "input_bits=4: the int8 export needs 8-bit inputs"),
                      (["--method", "dynamic-tensor"], "dynamic input quantization"),
                      (["--method", "spiq", "--wbits", "10"], "weight_bits=10"),
                      (["--config", str(cfg)], "overrides['blocks.1.0.conv_pw']: input_bits=6")]:
        assert cli.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert why in _one_error_line(err) and "quantizing" not in err
    # --check: a method to compare with, and a folder that is there, both before any work
    for args, why in [(["--method", "fp", "--check", str(tmp_path)], "give a quantization method"),
                      (["--method", "spiq", "--check", str(tmp_path / "none")], "does not exist")]:
        assert cli.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert why in _one_error_line(err) and "quantizing" not in err
    assert not any(tmp_path.glob("*.onnx"))
    check_exportable(QuantConfig(method="calib-mse", overrides={"conv_stem": {"skip": True, "input_bits": 4}}))
    with pytest.raises(ExportError, match="vision transformers"):
        check_exportable(QuantConfig(method="liu-ptq"))


SWEEP = ["sweep", "--model", "efficientnet_lite0", "--methods", "spiq,static-tensor", "--wbits", "8",
         "--abits", "8,4", "--limit", "2"]


@pytest.mark.parametrize("change, why", [
    ({"--methods": ","}, "--methods is empty"),
    ({"--methods": "spiq,spiqq"}, "got 'spiqq' (did you mean 'spiq'"),
    ({"--methods": "fp"}, "fp is the reference"),
    ({"--wbits": "8,1"}, "weight_bits must be from 2 to 16, got 1"),
    ({"--abits": "17"}, "input_bits must be from 2 to 16, got 17"),
    ({"--abits": "4.5"}, "argument --abits: bits must be an integer"),
    ({"--jobs": "0"}, "argument --jobs: must be a positive integer"),
    ({"--model": "efficientnet_lite0,resnet_18"}, "unknown model 'resnet_18'"),
])
def test_sweep_refuses_bad_arguments_before_any_work(change, why, tmp_path, capsys):
    from spiq import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(ROOT / "assets" / "cat.jpg", folder / "n02123159_tiger_cat.jpg")
    args = [*SWEEP, "--images", str(folder), "--out", str(tmp_path / "out")]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    try:
        rc = cli.main(args)
    except SystemExit as exc:   # refused by the parser
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and why in _one_error_line(err)
    assert "sweep cells" not in err and not (tmp_path / "out").exists()


def test_sweep_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys):
    from spiq import cli

    (tmp_path / "file.txt").write_text("x")
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(ROOT / "assets" / "cat.jpg", folder / "n02123159_tiger_cat.jpg")
    bad = [(tmp_path / "file.txt", "is not a directory"), (tmp_path / "missing", "does not exist")]
    if os.geteuid() != 0:   # root writes into any folder
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        bad.append((locked / "out", "cannot be written: Permission denied"))
    for out, why in bad:
        images = tmp_path / "missing" if why == "does not exist" else folder
        assert cli.main([*SWEEP, "--images", str(images), "--out", str(out if why != "does not exist" else tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert why in _one_error_line(err) and "sweep cells" not in err


@pytest.mark.slow   # two spawned processes, each loading the model
def test_sweep_with_two_jobs_writes_the_same_cells_as_one(tmp_path, sample_dir):
    base = ["sweep", "--model", "efficientnet_lite0", "--images", str(sample_dir), "--methods",
            "dynamic-channel,dynamic-tensor", "--wbits", "8", "--abits", "8,6", "--limit", "6"]
    r = _spiq(*base, "--out", str(tmp_path / "two"), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "4/4" in r.stderr and "4 computed" in r.stdout
    r = _spiq(*base, "--out", str(tmp_path / "one"), "--abits", "6")
    assert r.returncode == 0, r.stderr
    for name in ("dynamic-channel__W8A6", "dynamic-tensor__W8A6"):
        two, one = (json.loads((tmp_path / d / "cells" / f"efficientnet_lite0__{name}.json").read_text())
                    for d in ("two", "one"))
        assert {k: v for k, v in two.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    assert len((tmp_path / "two" / "sweep.csv").read_text().splitlines()) == 1 + 4
def _advise_with(monkeypatch, table, calls=None):
    """`spiq advise` in this process, with the fast tier's sensitivity table instead of a new one."""
    from spiq import cli
    from spiq.analysis import sensitivity as sens

    def fake(*args, **kwargs):
        if calls is not None:
            calls.append(args)
        return table
    monkeypatch.setattr(sens, "sensitivity", fake)
    return cli.main


def test_advise_writes_a_loadable_recipe_and_reads_no_image(tmp_path, monkeypatch, capsys, lite0_sensitivity, lite0):
    import spiq
    from spiq.quantize.api import check_config

    table, opened, _, _ = lite0_sensitivity
    main = _advise_with(monkeypatch, table)
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: pytest.fail(f"advise opened {fp}") or real_open(fp))
    recipe, out = tmp_path / "r" / "recipe.json", tmp_path / "out.json"
    assert main(["advise", "--model", "efficientnet_lite0", "--method", "spiq", "--wbits", "8", "--abits", "4",
                 "--budget", "4.5", "--widths", "4,8", "--out", str(recipe), "--json", str(out)]) == 0
    config = spiq.QuantConfig.from_json(recipe.read_text())
    check_config(lite0, config)
    report = json.loads(out.read_text())
    assert report["input_budget_used"] <= 4.5 and report["predicted_sqnr_db"] > 0
    assert config.to_dict() == report["recipe"] and config.overrides   # some layers at 8 bits
    assert "predicted logit SQNR" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--budget", "3.5"], "budget must lie from the smallest width (4)"),
    (["--budget", "8.5"], "to the largest (8)"),
    (["--budget", "5", "--weight-budget", "2"], "weight-budget must lie"),
    (["--budget", "5", "--widths", "4,x"], "widths must be comma-separated integers"),
    (["--budget", "5", "--widths", "1,8"], "widths must be integers from 2 to 16"),
    (["--budget", "5", "--model", "no_such_model"], "no_such_model"),
    (["--budget", "5", "--out", "{tmp}"], "is a directory"),
    (["--budget", "5", "--method", "fp"], "invalid choice"),
])
def test_advise_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    calls = []
    main = _advise_with(monkeypatch, [], calls)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["advise", "--model", "efficientnet_lite0", "--method", "spiq", "--abits", "4",
            "--out", str(tmp_path / "r.json"), *args]
    try:
        code = main(argv)
    except SystemExit as exc:   # argparse's refusals
        code = exc.code
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and message in line and not calls
    assert not (tmp_path / "r.json").exists()
