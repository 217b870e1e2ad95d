import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import spiq
from conftest import LITES
from spiq.analysis.evaluate import load_images, predict
from spiq.models import registry
from spiq.models.data import open_image
from spiq.models.registry import get_spec


# Float top-1 on all 500 sample images with the registered preprocess (bicubic, resize = crop + 32).
LITE_TOP1 = {"efficientnet_lite0": 0.874, "efficientnet_lite1": 0.866, "efficientnet_lite2": 0.880}
ROOT = Path(__file__).resolve().parents[2]


def test_lite_classifies_real_images(lite, sample_dir, request):
    name, model = lite
    if name == "efficientnet_lite0":
        images, labels = request.getfixturevalue("sample")
    else:
        images, labels, _ = load_images(sample_dir, get_spec(name).preprocess)
    top1 = (predict(model, images) == labels).float().mean().item()
    assert top1 >= LITE_TOP1[name] - 0.02, f"embedded {name} top-1 {top1:.3f} on {len(labels)} real images"


def test_lite_uses_tf_port_conventions(lite):
    name, model = lite
    pre = get_spec(name).preprocess
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert (pre.crop, pre.resize, pre.interpolation) == (LITES[name], LITES[name] + 32, "bicubic")
    lo, hi = pre.input_bounds()
    assert torch.allclose(lo, -torch.ones(3)) and torch.allclose(hi, torch.ones(3))
    assert type(model.conv_stem).__name__ == "Conv2dSame"
    assert model.bn1.eps == pytest.approx(1e-3)
    assert spiq.availability(name) is None and "offline" in get_spec(name).tags


def test_lite_weights_map_fully_onto_timm(lite):
    """Every tensor of the package's file lands, in key order, on the timm model's parameter or buffer."""
    name, model = lite
    source = torch.load(registry._lite_file(int(name[-1])), map_location="cpu", weights_only=True)
    target = model.state_dict()
    assert len(source) == len(target)
    for (src, s), (dst, t) in zip(source.items(), target.items()):
        assert torch.equal(s, t), (src, dst)


def test_lite_recognises_the_example_photos(lite):
    name, model = lite
    pre = get_spec(name).preprocess
    x = torch.stack([pre(open_image(ROOT / "assets" / f)) for f in ("cat.jpg", "coffee.jpg", "camera.jpg")])
    assert x.shape[-1] == LITES[name]
    with torch.no_grad():
        cat, coffee, camera = model(x).argmax(1).tolist()
    assert cat in (281, 282, 285)   # tabby, tiger cat, Egyptian cat
    assert (coffee, camera) == (967, 872)   # espresso, tripod


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


def test_a_model_to_download_is_loadable_when_its_host_answers(tmp_path, monkeypatch):
    """The app offers what can be downloaded (a Space), and asks each host once per few minutes."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))   # nothing cached
    asked = []

    def host(endpoint, timeout=5.0):
        asked.append(endpoint)
        return answer
    monkeypatch.setattr(registry, "_hub_unreachable", host)
    monkeypatch.setattr(registry, "_reached", {})
    answer = None
    assert spiq.availability("resnet18") is not None and registry.loadable("resnet18") is None
    assert registry.loadable("mobilenet_v2") is None and asked == [registry.TORCHVISION_HOST]
    answer = "download.pytorch.org: Name or service not known"
    monkeypatch.setattr(registry, "_reached", {})
    problem = registry.loadable("resnet18")
    assert "not cached" in problem and "unreachable (download.pytorch.org: Name or service not known)" in problem
    assert registry.loadable("efficientnet_lite0") is None   # embedded: no host asked
    assert asked == [registry.TORCHVISION_HOST] * 2


def test_hub_offline_mode_makes_a_timm_model_unloadable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(registry, "_hf_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(registry, "_hub_unreachable", lambda *a, **k: None)
    assert "HF_HUB_OFFLINE is set" in registry.loadable("deit_tiny_patch16_224")


@pytest.mark.slow   # a heavy end-to-end job
def test_cli_lists_models_with_offline_availability():
    out = subprocess.run([sys.executable, "-m", "spiq", "models"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for name in LITES:
        assert " yes " in lines[name]
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


def test_registered_models_are_there_inside_the_block_only():
    from spiq.models import registry
    from spiq.models.toy import toy_cnn

    spec = registry.ModelSpec("toy_block", "random weights (tests)", lambda: toy_cnn()[0], lambda: None, toy_cnn()[1])
    before = registry.list_models()
    with registry.registered(spec):
        assert registry.list_models() == [*before, "toy_block"] and registry.loadable("toy_block") is None
    assert registry.list_models() == before
    with pytest.raises(RuntimeError, match="raised inside"):
        with registry.registered(spec, only=True):
            assert registry.list_models() == ["toy_block"]
            raise RuntimeError("raised inside")
    assert registry.list_models() == before
