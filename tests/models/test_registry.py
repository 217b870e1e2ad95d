import subprocess
import sys
import urllib.error

import pytest
import torch

import spiq
from spiq.analysis.evaluate import predict
from spiq.models.registry import get_spec


def test_lite0_classifies_real_images(lite0, sample):
    images, labels = sample
    top1 = (predict(lite0, images) == labels).float().mean().item()
    assert top1 >= 0.80, f"embedded EfficientNet-Lite0 top-1 {top1:.3f} on {len(labels)} real images"


def test_lite0_uses_tf_port_conventions(lite0):
    pre = get_spec("efficientnet_lite0").preprocess
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    lo, hi = pre.input_bounds()
    assert torch.allclose(lo, -torch.ones(3)) and torch.allclose(hi, torch.ones(3))
    assert type(lite0.conv_stem).__name__ == "Conv2dSame"
    assert lite0.bn1.eps == pytest.approx(1e-3)


def test_load_model_returns_preprocess_and_classes():
    model, preprocess, classes = spiq.load_model("efficientnet_lite0")
    assert len(classes) == 1000 and classes[0] == "tench"
    from PIL import Image

    x = preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_unknown_model_names_close_matches():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        spiq.load_model("efficientnet_lite")


def test_torchvision_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):  # what torch.hub raises with no network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    assert "not cached" in spiq.availability("resnet18")
    with pytest.raises(spiq.ModelUnavailableError) as err:
        spiq.load_model("resnet18")
    msg = str(err.value)
    assert str(tmp_path) in msg and "resnet18" in msg and "URLError" in msg


@pytest.mark.slow   # a heavy end-to-end job
def test_cli_lists_models_with_offline_availability():
    out = subprocess.run([sys.executable, "-m", "spiq", "models"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert " yes " in lines["efficientnet_lite0"]
    for name in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"):
        assert name in lines


def test_downloaded_torchvision_checkpoints_are_read_as_tensors_only(tmp_path, monkeypatch):
    """A checkpoint in the hub cache is loaded with weights_only=True: tensors load, code does not run."""
    import pickle

    from torchvision.models import resnet18

    from spiq.models.registry import ModelUnavailableError, _tv_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / _tv_cache_path("resnet18").rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    assert _tv_cache_path("resnet18") == str(path)
    state = resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    model = get_spec("resnet18").build()
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ModelUnavailableError):
        get_spec("resnet18").build()
    assert not marker.exists()
