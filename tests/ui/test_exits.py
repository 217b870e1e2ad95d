"""The server's exits, with real processes and real signals: SIGTERM and Ctrl-C stop the background
children, delete the scratch and exit with status 0; after a SIGKILL (the OOM killer's way) the
children die anyway and the next process sweeps the scratch folder.

Each process gets a TMPDIR of its own (in its environment, so its children carry it too): what it
leaves is what that folder holds, and the processes it leaves are those whose environment names it.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]

# A server in miniature: the app's exit handlers, a scratch folder with a file in it, a library's
# temporary folder, and a background child (a shell with a `sleep` of its own) in place of
# `spiq distill`. It prints its scratch folder once the child has written the pids of both.
SERVER = r"""
import sys, tempfile, time
from pathlib import Path
from spiq.ui import lifecycle
from spiq.ui.background import BackgroundDistiller
from spiq.ui.scratch import ScratchDir

lifecycle.install()
scratch = ScratchDir("spiq-onnx-", 6)
(scratch.entry("model") / "model.onnx").write_bytes(bytes(1 << 20))
# what ONNX Runtime's quantize_static leaves while it calibrates
(Path(tempfile.mkdtemp(prefix="ort.quant.")) / "augmented_model.onnx").write_bytes(bytes(1 << 20))
pids = Path(sys.argv[1])
script = f"echo $$ > {pids}.tmp; sleep 60 & echo $! >> {pids}.tmp; mv {pids}.tmp {pids}; wait"
BackgroundDistiller(lambda name: ["sh", "-c", script]).start(["model"])
while not pids.exists():
    time.sleep(0.05)
print(scratch.root, flush=True)
time.sleep(300)
"""


def _default_sigint():   # pytest may run with SIGINT ignored (a background job), and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], tmp: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False", **kwargs.pop("env", {})}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen([sys.executable, *args], env=env, text=True, preexec_fn=_default_sigint, **pipes)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"   # a zombie has ended: a container's PID 1 may never reap it


def _ours(tmp: Path) -> list[int]:
    """The live processes whose environment has TMPDIR=`tmp`."""
    mark = f"TMPDIR={tmp}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in proc.joinpath("environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _gone(pids, timeout: float = 10.0) -> list[int]:
    """The pids still alive after `timeout` (they may take a moment to get their signal)."""
    deadline = time.time() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def tmp(tmp_path):
    """A TMPDIR for the processes of one test; whatever they leave running is killed at the end."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    yield folder
    for pid in _ours(folder):
        os.kill(pid, signal.SIGKILL)


def _start_server(tmp: Path, name: str) -> tuple[subprocess.Popen, Path, list[int]]:
    """The miniature server, once ready: (process, its scratch folder, its child's and grandchild's pids)."""
    pids = tmp.parent / f"{name}.pids"
    proc = _spawn(["-c", SERVER, str(pids)], tmp)
    line = proc.stdout.readline()
    assert line, f"the server did not start: {proc.communicate()[1][-2000:]}"
    return proc, Path(line.strip()), [int(p) for p in pids.read_text().split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_children_deletes_the_scratch_and_exits_cleanly(tmp, sig):
    proc, scratch, children = _start_server(tmp, "server")
    assert (scratch / "model" / "model.onnx").is_file() and all(map(_alive, children))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    assert _gone(children) == []   # the shell and its own child, the whole process group
    assert list(tmp.iterdir()) == []
    assert _gone(_ours(tmp)) == []


def test_after_a_sigkill_the_children_die_and_the_next_process_sweeps_the_scratch(tmp):
    killed, scratch, (child, _) = _start_server(tmp, "killed")
    alive, alive_scratch, _ = _start_server(tmp, "alive")
    killed.kill()
    killed.communicate(timeout=30)
    assert _gone([child]) == []   # its parent-death signal: nothing in the server ran
    assert scratch.is_dir()       # nothing could delete it
    sweeper = _spawn(["-c", "from spiq.ui.scratch import ScratchDir; ScratchDir('spiq-recipe-', 1)"], tmp)
    _, err = sweeper.communicate(timeout=120)
    assert sweeper.returncode == 0, err[-2000:]
    assert not scratch.exists()
    assert alive_scratch.is_dir()   # its owner lives: kept
    alive.terminate()
    alive.communicate(timeout=30)
    assert list(tmp.iterdir()) == []


def test_the_sweep_keeps_live_owners_and_tells_a_reused_pid_apart(tmp_path):
    from spiq.ui.scratch import start_time, sweep

    me = os.getpid()
    mine = tmp_path / f"spiq-{me}-{start_time(me)}-abcd1234"
    reused = tmp_path / f"spiq-{me}-1-abcd1234"   # a dead process's, which had this pid
    other = tmp_path / "spiq-onnx-abcd1234"       # no owner in its name: not a process folder
    for folder in (mine, reused, other):
        folder.mkdir()
    (tmp_path / "spiq-999999999-1-link").symlink_to(other)
    assert sweep(tmp_path) == [reused]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "spiq-999999999-1-link"])


@pytest.mark.slow   # the real app: ~15 s to start on an idle machine, a minute on a busy one
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_the_app_exits_cleanly_on_ctrl_c_and_sigterm(tmp, sig):
    port = free_port()
    log = tmp.parent / "app.log"   # a file, not a pipe: nothing reads the app's output while it runs
    with log.open("w") as out:
        proc = _spawn(["app.py"], tmp, cwd=ROOT, env={"GRADIO_SERVER_PORT": str(port)}, stdout=out, stderr=out)
    wait_serving(proc, port, log.read_text)
    assert [p.name for p in tmp.glob("spiq-*")] != []   # its scratch, while it runs
    proc.send_signal(sig)
    proc.wait(timeout=30)
    err = log.read_text()
    assert proc.returncode == 0, err[-2000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    # torch and Gradio keep caches in the temp folder too; the app's own folders are spiq-*
    assert list(tmp.glob("spiq-*")) == []
    assert _gone(_ours(tmp)) == []
