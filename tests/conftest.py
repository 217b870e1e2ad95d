import os
from pathlib import Path

import pytest
import torch

import spiq
from spiq.analysis.evaluate import load_images, predict
from spiq.core.memory import keep_freed_memory
from spiq.models.vit import toy_vit

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("SPIQ_SAMPLE_DIR", ROOT.parent / "shared" / "data" / "imagenet-sample"))

torch.set_num_threads(2)
keep_freed_memory()


@pytest.fixture(scope="session")
def lite0_loaded() -> spiq.LoadedModel:
    """The embedded EfficientNet-Lite0 with its preprocess: what quantize() and prepare() take."""
    return spiq.load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0(lite0_loaded):
    return lite0_loaded.model


# The embedded EfficientNet-Lites (PyPI packages, no download) and their input size.
LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.fixture(scope="module", params=list(LITES))
def lite(request):
    """(name, model) for each embedded EfficientNet-Lite, built once per module (Lite0: the session's)."""
    name = request.param
    return name, request.getfixturevalue("lite0") if name == "efficientnet_lite0" else spiq.load_model(name).model


# Tests that read the real ImageNet sample form the `slow` tier: they run whenever the sample is
# there (CI always has it) and are skipped, with the reason, on a clone without it.
SAMPLE_FIXTURES = {"sample", "subset", "vit_images", "sample_dir"}
NO_SAMPLE = f"the ImageNet sample is not at {SAMPLE_DIR}: set SPIQ_SAMPLE_DIR to a folder of <synset>_*.jpg images"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SAMPLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            if not SAMPLE_DIR.is_dir():
                item.add_marker(pytest.mark.skip(reason=NO_SAMPLE))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real ImageNet sample folder (the test is skipped without it)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample(sample_dir):
    """All real sample images, preprocessed for EfficientNet-Lite0, with their labels."""
    model, preprocess, _ = spiq.load_model("efficientnet_lite0")
    images, labels, paths = load_images(sample_dir, preprocess)
    return images, labels


@pytest.fixture(scope="session")
def subset(sample, lite0):
    """Every 4th sample image (125) and the float model's top-1 on them."""
    images, labels = sample
    x, y = images[::4], labels[::4]
    return x, y, predict(lite0, x)


@pytest.fixture(scope="session")
def vit():
    return toy_vit()[0]


@pytest.fixture(scope="session")
def vit_images(sample_dir):
    """48 real sample images for the ViT: 16 to calibrate on, 32 held out."""
    _, pre = toy_vit()
    images, _, _ = load_images(sample_dir, pre, limit=48)
    return images[:16], images[16:]


APP_VIT = "vit_random_test"
APP_CNN = "cnn_random_test"   # a CNN with BatchNorm whose bias-fit images neither ship nor are cached


@pytest.fixture(scope="session")
def app():
    """app.py served on a free port, with a small random ViT and CNN registered beside the real
    models (no ViT weights offline). Yields (the app module, its URL)."""
    import sys

    from spiq.models import registry
    from spiq.models.toy import toy_cnn

    pre = toy_vit()[1]
    with registry.registered(
            registry.ModelSpec(APP_VIT, "random weights (tests)", lambda: toy_vit()[0], lambda: None, pre,
                               "random ViT", ("vit",)),
            registry.ModelSpec(APP_CNN, "random weights (tests)", lambda: toy_cnn(classes=1000)[0], lambda: None,
                               toy_cnn()[1], "random CNN", ("cnn",))):
        sys.path.insert(0, str(ROOT))
        import app as app_module
        from spiq.ui.server import launch_options

        app_module.demo.queue(default_concurrency_limit=8)
        _, url, _ = app_module.demo.launch(prevent_thread_lock=True, quiet=True, **launch_options())
        yield app_module, url
        app_module.demo.close()


# The data-free sensitivity table of EfficientNet-Lite0 that the fast tier checks (analysis and the
# CLI's advise): two widths, four of the shipped distilled images, SPIQ as in the paper
# (fold="always": one range search per width, not two), to keep it to about a minute.
SENSITIVITY_CONFIG = dict(method="spiq", weight_bits=8, input_bits=4, fold="always")
SENSITIVITY_WIDTHS = (4, 8)


@pytest.fixture(scope="session")
def lite0_sensitivity(lite0_loaded):
    """(table, the files opened while it was measured, the images it was measured on, its memo)."""
    from PIL import Image

    from spiq.analysis.sensitivity import sensitivity
    from spiq.quantize.memo import Memo

    config = spiq.QuantConfig(**SENSITIVITY_CONFIG)
    opened, real_open = [], Image.open

    def spy(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "open", spy)
        memo = Memo(lite0_loaded)
        images = memo.distilled_images(8)[:4]
        table = sensitivity(lite0_loaded, config, SENSITIVITY_WIDTHS, images=images, memo=memo)
    return table, opened, images, memo


def without_fit_images(monkeypatch, cache, name: str) -> None:
    """The app's cache as if model `name` had never been quantized: bias-fit images another test
    found are forgotten (restored after the test)."""
    from spiq.core.lru import LRU

    kept = LRU()
    for other in cache._memos:
        if other != name:
            kept[other] = cache._memos[other]
    monkeypatch.setattr(cache, "_memos", kept)


def cache_fit_images(loaded) -> None:
    """What `spiq distill --model NAME` leaves in the cache for `loaded` (in 3 optimisation steps, not 300)."""
    from spiq.quantize import distill
    from spiq.quantize.memo import distill_bounds

    lo, hi, size = distill_bounds(loaded.preprocess)
    pixels = distill.to_pixels(distill.distill_images(loaded.model, 8, lo, hi, size, steps=3), lo, hi)
    distill.write_pixels(distill.cache_dir() / distill.image_key(loaded.model, 8, lo, hi, size), pixels)


# Shipped example photos under the synset names of what they show: a labelled folder in seconds.
LABELLED_PHOTOS = {"n02123159_tiger_cat.jpg": "cat.jpg", "n07920052_espresso.jpg": "coffee.jpg",
                   "n04266014_space_shuttle.jpg": "rocket.jpg", "n03976467_polaroid_camera.jpg": "camera.jpg"}


def labelled_photos(folder: Path, count: int = len(LABELLED_PHOTOS)) -> Path:
    """`folder` made and filled with the first `count` of LABELLED_PHOTOS."""
    import shutil

    folder.mkdir(parents=True)
    for name, asset in list(LABELLED_PHOTOS.items())[:count]:
        shutil.copy(ROOT / "assets" / asset, folder / name)
    return folder


TOY_CNN = "toy_cnn_test"


@pytest.fixture
def register(request):
    """`register(*specs, only=False)`: these models in the registry for the test (`registry.registered`)."""
    from spiq.models import registry

    def add(*specs, only=False):
        block = registry.registered(*specs, only=only)
        block.__enter__()
        request.addfinalizer(lambda: block.__exit__(None, None, None))
    return add


@pytest.fixture
def toy_model(register) -> str:
    """A random mini CNN registered as model TOY_CNN for the test: it quantizes in well under a second."""
    from spiq.models import registry
    from spiq.models.toy import toy_cnn

    register(registry.ModelSpec(TOY_CNN, "random weights (tests)", lambda: toy_cnn()[0], lambda: None, toy_cnn()[1],
                                "toy CNN", ()))
    return TOY_CNN


def load_script(path: Path):
    """A script under tests/ (not a package) loaded by path, as it runs; bench/ is a package: import bench.<name>."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(proc, port: int, output, timeout: float = 240) -> None:
    """Return once `proc` (app.py) accepts connections on `port`; fail with the end of its output
    (`output()`) if it exits or does not serve within `timeout` s."""
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited: {output()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"app.py did not serve within {timeout:g} s")
