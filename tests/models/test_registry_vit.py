"""Vision-transformer entries of the registry: names, preprocessing, offline errors, torchvision->timm conversion.

Nothing here downloads: the weights are absent on the test machines, and the conversion is checked on a
randomly initialised torchvision model.
"""
import time

import pytest
import torch
from huggingface_hub import constants as hf_constants
from torch import nn

import spiq
from spiq.models import registry
from spiq.models.registry import _tv_vit_to_timm, get_spec

TIMM_VITS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_base_patch16_224"]
VITS = TIMM_VITS + ["vit_b_16"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face and torch.hub caches at empty folders, so "not cached" is true whatever the machine has."""
    hf, hub = tmp_path / "hf", tmp_path / "torchhub"
    hf.mkdir()
    hub.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hf, hub


def test_vits_are_registered_and_tagged():
    names = spiq.list_models()
    for name in VITS:
        assert name in names
        assert get_spec(name).tags == ("vit", "download")


@pytest.mark.parametrize("name, mean, std, resize, interpolation", [
    ("deit_tiny_patch16_224", IMAGENET_MEAN, IMAGENET_STD, 248, "bicubic"),
    ("deit_small_patch16_224", IMAGENET_MEAN, IMAGENET_STD, 248, "bicubic"),
    ("deit_base_patch16_224", IMAGENET_MEAN, IMAGENET_STD, 248, "bicubic"),
    ("vit_base_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 248, "bicubic"),
    ("vit_b_16", IMAGENET_MEAN, IMAGENET_STD, 256, "bilinear"),
])
def test_vit_preprocess(name, mean, std, resize, interpolation):
    pre = get_spec(name).preprocess
    assert pre.crop == 224 and pre.resize == resize and pre.interpolation == interpolation
    assert pre.mean == pytest.approx(mean) and pre.std == pytest.approx(std)


@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_preprocess_matches_timm_eval_transform(name):
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    from torchvision import transforms

    tf = create_transform(**resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(name).to_dict()))
    resize = next(t for t in tf.transforms if isinstance(t, transforms.Resize))
    crop = next(t for t in tf.transforms if isinstance(t, transforms.CenterCrop))
    pre = get_spec(name).preprocess
    assert pre.resize == resize.size and (pre.crop, pre.crop) == tuple(crop.size)
    assert pre.interpolation == resize.interpolation.value


@pytest.mark.parametrize("name", VITS)
def test_vit_availability_names_the_cache(name, empty_caches):
    hf, hub = empty_caches
    problem = spiq.availability(name)
    assert problem is not None and "not cached" in problem
    assert str(hub if name == "vit_b_16" else hf) in problem


def test_timm_vit_available_when_cached(empty_caches):
    hf, _ = empty_caches
    # The hub cache layout: models--{org}--{name}/snapshots/{commit}/file, refs/main -> commit.
    repo = hf / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    assert spiq.availability("deit_tiny_patch16_224") is None
    assert spiq.availability("deit_small_patch16_224") is not None


@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_vit_offline_mode_fails_at_once(name, empty_caches, monkeypatch):
    import timm
    from timm.models import get_pretrained_cfg

    hf, _ = empty_caches
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def must_not_download(*args, **kwargs):
        raise AssertionError("create_model was called although HF_HUB_OFFLINE is set and nothing is cached")

    monkeypatch.setattr(timm, "create_model", must_not_download)
    with pytest.raises(spiq.ModelUnavailableError) as err:
        spiq.load_model(name)
    msg = str(err.value)
    assert name in msg and "HF_HUB_OFFLINE" in msg and str(hf) in msg
    assert get_pretrained_cfg(name).hf_hub_id in msg


def test_timm_vit_failed_download_is_a_clear_error(empty_caches, monkeypatch):
    """What create_model raises with no network (after ~45 s of retries here) becomes a ModelUnavailableError."""
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    hf, _ = empty_caches
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(registry, "_hub_unreachable", lambda *_a, **_k: None)   # the hub answers, the file fails
    start = time.monotonic()
    with pytest.raises(spiq.ModelUnavailableError) as err:
        spiq.load_model("deit_small_patch16_224")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "deit_small_patch16_224" in msg and "timm/deit_small_patch16_224.fb_in1k" in msg
    assert str(hf) in msg and "LocalEntryNotFoundError" in msg and "not cached" in msg


def test_timm_vit_unreachable_hub_fails_fast(empty_caches, monkeypatch):
    """No network at all (as here): the probe answers in seconds, not huggingface_hub's ~47 s of retries."""
    hf, _ = empty_caches
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(registry, "_hub_unreachable", lambda *_a, **_k: "huggingface.co: Name or service not known")
    with pytest.raises(spiq.ModelUnavailableError, match="unreachable.*Name or service not known") as err:
        spiq.load_model("deit_tiny_patch16_224")
    assert str(hf) in str(err.value)
    assert registry._hub_unreachable("http://127.0.0.1:9", timeout=2) is not None   # nothing listens on port 9


def test_tv_vit_offline_is_a_clear_error(empty_caches, monkeypatch):
    import urllib.error

    import torchvision.models._api as tv_api

    _, hub = empty_caches

    def offline(*args, **kwargs):  # what torch.hub raises with no network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(spiq.ModelUnavailableError) as err:
        spiq.load_model("vit_b_16")
    msg = str(err.value)
    assert "vit_b_16" in msg and str(hub) in msg and "URLError" in msg


def _randomise(tv_model: nn.Module) -> None:
    """Move the parameters torchvision initialises to constants, so a swapped mapping would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in tv_model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_(0, 0.2, generator=g)
                m.out_proj.bias.normal_(0, 0.2, generator=g)
        tv_model.class_token.normal_(0, 1, generator=g)
        # torchvision zero-initialises the head, which would make every logit 0 on both sides.
        tv_model.heads.head.weight.normal_(0, 0.05, generator=g)
        tv_model.heads.head.bias.normal_(0, 0.1, generator=g)


def test_tv_vit_converts_to_an_equivalent_timm_vit():
    import torchvision
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tv_model = torchvision.models.vit_b_16(weights=None).eval()
    _randomise(tv_model)
    timm_model = _tv_vit_to_timm(tv_model).eval()
    assert isinstance(timm_model, VisionTransformer)
    assert len(timm_model.blocks) == 12 and timm_model.embed_dim == 768 and timm_model.blocks[0].attn.num_heads == 12
    assert timm_model.norm.eps == pytest.approx(1e-6) and timm_model.blocks[0].norm1.eps == pytest.approx(1e-6)

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = tv_model(x), timm_model(x)
    assert out.shape == ref.shape == (2, 1000)
    scale = ref.abs().max().item()
    assert scale > 0.1  # a degenerate (near-constant) output would make the comparison vacuous
    assert (out - ref).abs().max().item() < 1e-4 * scale
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_tv_vit_conversion_keeps_custom_sizes():
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    tv_model = TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=48,
                     num_classes=10).eval()
    _randomise(tv_model)
    timm_model = _tv_vit_to_timm(tv_model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = tv_model(x), timm_model(x)
    assert out.shape == (3, 10)
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_tv_vit_conversion_refuses_a_representation_layer():
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    tv_model = TvViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=48,
                     num_classes=10, representation_size=8)
    with pytest.raises(ValueError, match="representation"):
        _tv_vit_to_timm(tv_model)
