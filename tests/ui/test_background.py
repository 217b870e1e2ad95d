"""The other models' bias-fit images, distilled in child processes at the lowest priority, and what
the app says and does while they are not ready."""
import sys

import pytest

from conftest import APP_CNN, cache_fit_images, without_fit_images
from spiq.ui import state
from spiq.ui.background import FAILED, READY, RUNNING, BackgroundDistiller, Job, distill_command
from spiq.ui.page import DEFAULT_MODEL

EMPTY_TABLE = {"headers": [], "data": []}   # no per-layer overrides


def test_children_run_at_the_lowest_priority_on_one_thread_and_report_their_error(tmp_path):
    seen = tmp_path / "seen"

    def command(name):
        if name == "probe":
            return [sys.executable, "-c", f"import os; open({str(seen)!r}, 'w').write("
                                          "f\"{os.nice(0)} {os.environ['OMP_NUM_THREADS']}\")"]
        return distill_command(name)

    bg = BackgroundDistiller(command)
    assert not bg.pending("probe") and bg.state("probe") is None
    bg.start(["probe", "no_such_model", "efficientnet_lite0"]).join(timeout=900)   # nice 19: on a busy machine the children wait
    assert seen.read_text() == "19 1"
    assert bg.state("probe").state == READY
    job = bg.state("no_such_model")
    assert job.state == FAILED and job.message.startswith("unknown model 'no_such_model'")
    assert bg.state("efficientnet_lite0").state == READY   # the real verb; its images ship
    assert not any(bg.pending(n) for n in bg.jobs)


def test_a_model_whose_fit_is_not_ready_is_used_at_once_with_the_fit_off(app, monkeypatch, tmp_path):
    from gradio_client import Client

    module, url = app
    monkeypatch.setenv("SPIQ_CACHE", str(tmp_path))
    without_fit_images(monkeypatch, state.CACHE, APP_CNN)   # another test may have made them
    monkeypatch.setattr(state.BACKGROUND, "jobs", {APP_CNN: Job(APP_CNN, RUNNING)})
    client = Client(url, verbose=False)
    # model, table, status, method, bias fit, its note, the timer asking again
    model, _, status, _, fit, note, timer = client.predict(APP_CNN, "spiq", 8, 4, "channel", "method default", True,
                                                           api_name="/select_model")
    assert model == APP_CNN and fit is False and '"bias_images": 0' in status and timer["active"] is True
    assert "being distilled in the background (running)" in note
    with pytest.raises(Exception, match="still being distilled in the background"):
        client.predict("spiq", 8, 4, "channel", "method default", True, EMPTY_TABLE, None, api_name="/apply")
    cache_fit_images(state.CACHE.load(APP_CNN))
    state.BACKGROUND.jobs[APP_CNN].state = READY
    status = module.page.fit_status(APP_CNN)   # {component: update}
    note, timer = status[module.page.fit_note], status[module.page.fit_timer]
    assert "ready: tick Bias fit and Apply" in note and timer.active is False
    recipe = client.predict("spiq", 8, 4, "channel", "method default", True, EMPTY_TABLE, None, api_name="/apply")[1]
    assert "bias_images" not in recipe   # the default, the fit on: applied from the background's images
    client.predict(DEFAULT_MODEL, "spiq", 8, 4, "channel", "method default", True, api_name="/select_model")
