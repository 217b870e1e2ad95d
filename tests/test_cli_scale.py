"""`--device`, `--batch-size`, `--workers` of `spiq evaluate` and `spiq sweep`: a device that is not
there is one line before any work; the workers and the batch size change no number of the result."""
import json
import subprocess
import sys

import pytest
import torch

from spiq import cli

NO_GPU = "--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu or --device auto"
EVALUATE = ["evaluate", "--model", "efficientnet_lite0", "--method", "spiq", "--wbits", "8", "--abits", "4"]


def _sweep(images, out):
    return ["sweep", "--model", "efficientnet_lite0", "--images", str(images), "--methods", "spiq", "--wbits", "8",
            "--abits", "4", "--out", str(out)]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    return line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_one_line_here(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spiq", *EVALUATE, "--images", str(tmp_path), "--device", "cuda"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and _one_error_line(r.stderr) == f"spiq: error: {NO_GPU}" and r.stdout == ""


def test_a_missing_device_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a machine with a GPU
    # an empty folder would be the next error: the device comes first
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"method": "spiq", "input_bits": 4}')
    report = ["report", "--model", "efficientnet_lite0", "--config", str(recipe), "--images", str(tmp_path),
              "--out", str(tmp_path / "out" / "report.html")]
    for argv in ([*EVALUATE, "--images", str(tmp_path)], _sweep(tmp_path, tmp_path / "out"), report):
        assert cli.main([*argv, "--device", "cuda"]) == 2
        assert _one_error_line(capsys.readouterr().err) == f"spiq: error: {NO_GPU}"
        assert cli.main([*argv, "--device", "tpu"]) == 2
        assert "--device 'tpu' is not a device" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,message", [("--workers", "-1", "must be a whole number (0 or more)"),
                                                ("--workers", "two", "must be a whole number (0 or more)"),
                                                ("--batch-size", "0", "must be a positive integer")])
def test_scale_counts_are_checked_at_parsing(flag, value, message, tmp_path, capsys):
    for argv in ([*EVALUATE, "--images", str(tmp_path)], _sweep(tmp_path, tmp_path / "out")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: {message}" in _one_error_line(capsys.readouterr().err)


def test_workers_and_batch_size_give_the_defaults_numbers(tmp_path, sample_dir):
    """64 sample images: batches of 25 by default against 32, decoded here against in 2 workers."""
    def run(*extra):
        out = tmp_path / f"r{len(extra)}.json"
        r = subprocess.run([sys.executable, "-m", "spiq", *EVALUATE, "--images", str(sample_dir), "--limit", "64",
                            "--device", "cpu", "--json", str(out), *extra], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        data = json.loads(out.read_text())
        del data["seconds"]
        return data, r.stdout.split(" in ")[0]
    default, scaled = run(), run("--workers", "2", "--batch-size", "32")
    assert scaled == default and default[0]["n_images"] == 64 and default[0]["agreement"] > 0.8
