import json
import subprocess
import sys

from PIL import Image

from conftest import SAMPLE_DIR


def _spiq(*args):
    return subprocess.run([sys.executable, "-m", "spiq", *args], capture_output=True, text=True, timeout=600)


def test_evaluate_writes_the_json_contract(tmp_path):
    out = tmp_path / "r.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(SAMPLE_DIR), "--method", "spiq",
              "--wbits", "8", "--abits", "6", "--limit", "24", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "agreement" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert "it/s" in r.stderr or "img/s" in r.stderr or "s/img" in r.stderr  # a progress bar ran
    data = json.loads(out.read_text())
    assert set(data) == {"model", "method", "wbits", "abits", "n_images", "top1", "top1_fp", "agreement", "seconds"}
    assert data["model"] == "efficientnet_lite0" and data["method"] == "spiq"
    assert (data["wbits"], data["abits"], data["n_images"]) == (8, 6, 24)
    assert 0.5 <= data["top1_fp"] <= 1 and 0.8 <= data["agreement"] <= 1 and data["seconds"] > 0


def test_evaluate_fp_and_config_file(tmp_path):
    out = tmp_path / "fp.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(SAMPLE_DIR), "--method", "fp",
              "--limit", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["agreement"] == 1.0 and data["top1"] == data["top1_fp"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method": "static-tensor", "weight_bits": 8, "input_bits": 8,
                               "overrides": {"conv_stem": {"skip": True}}}))
    out2 = tmp_path / "c_out.json"
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(SAMPLE_DIR), "--config", str(cfg),
              "--limit", "8", "--json", str(out2))
    assert r.returncode == 0, r.stderr
    assert json.loads(out2.read_text())["method"] == "static-tensor"


def test_evaluate_bad_input_is_a_clear_error(tmp_path):
    base = ["evaluate", "--model", "efficientnet_lite0", "--method", "spiq", "--wbits", "8", "--abits", "8"]
    r = _spiq(*base, "--images", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _spiq(*base, "--images", str(tmp_path))
    assert r.returncode == 2 and "holds no images" in r.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.jpg")
    r = _spiq(*base, "--images", str(tmp_path))
    assert r.returncode == 2 and "no ImageNet synset" in r.stderr
    r = _spiq("evaluate", "--model", "efficientnet_lite0", "--images", str(SAMPLE_DIR), "--method", "spiq",
              "--wbits", "8", "--abits", "1")
    assert r.returncode == 2 and "input_bits must be from 2 to 16" in r.stderr
    r = _spiq("evaluate", "--model", "resnet_18", "--images", str(SAMPLE_DIR), "--method", "fp")
    assert r.returncode == 2 and "unknown model 'resnet_18'" in r.stderr and "resnet18" in r.stderr


def test_evaluate_liu_ptq_on_a_transformer_with_calibration_folder(tmp_path, monkeypatch, capsys):
    from spiq import cli, registry
    from spiq.vit import toy_vit

    pre = toy_vit()[1]
    monkeypatch.setitem(registry._REGISTRY, "toy_vit", registry.ModelSpec(
        "toy_vit", "random weights (tests)", lambda: toy_vit()[0], lambda: None, pre, "toy ViT", ("vit",)))
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted(SAMPLE_DIR.iterdir())[-6:]:   # images kept apart from the 8 evaluated
        (calib / f.name).symlink_to(f)
    out = tmp_path / "r.json"
    rc = cli.main(["evaluate", "--model", "toy_vit", "--images", str(SAMPLE_DIR), "--limit", "8", "--method", "liu-ptq",
                   "--wbits", "6", "--abits", "6", "--calib", str(calib), "--calib-n", "4", "--mixed-precision", "6",
                   "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert (data["method"], data["wbits"], data["abits"], data["n_images"]) == ("liu-ptq", 6, 6, 8)
    assert "4/4" in err and "quantizing" in err     # four calibration images decoded, the search's progress shown
    rc = cli.main(["evaluate", "--model", "toy_vit", "--images", str(SAMPLE_DIR), "--limit", "8", "--method", "liu-ptq",
                   "--calib", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli.main(["evaluate", "--model", "efficientnet_lite0", "--images", str(SAMPLE_DIR), "--limit", "8",
                   "--method", "liu-ptq", "--calib", str(calib)])
    assert rc == 2 and "vision transformers" in capsys.readouterr().err


def test_distill_writes_the_shipped_form_and_refuses_what_it_cannot_do(tmp_path, monkeypatch, capsys):
    import torch

    from spiq import cli, distill, registry
    from spiq.vit import toy_vit

    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ship"
    assert cli.main(["distill", "--model", "efficientnet_lite0", "--out", str(out)]) == 0, capsys.readouterr().err
    (written,) = out.iterdir()
    shipped = distill.SHIPPED / written.name   # the package's own images, found by the same key
    assert torch.equal(distill.read_pixels(written, 8, 224), distill.read_pixels(shipped, 8, 224))
    assert not (tmp_path / "cache").exists()   # read from the package, not distilled into the cache
    assert cli.main(["distill", "--model", "efficientnet_lite0", "--images", "0"]) == 2
    assert "--images must be from 1 to 256" in capsys.readouterr().err
    monkeypatch.setitem(registry._REGISTRY, "toy_vit", registry.ModelSpec(
        "toy_vit", "random weights (tests)", lambda: toy_vit()[0], lambda: None, toy_vit()[1], "toy ViT", ("vit",)))
    assert cli.main(["distill", "--model", "toy_vit"]) == 2
    assert "no BatchNorm" in capsys.readouterr().err
