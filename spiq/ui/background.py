"""Bias-fit images of the other models, distilled in the background after start, one model at a time.

Each model is distilled by `spiq distill --model NAME` in a child process at the lowest CPU
priority (nice 19, and the SCHED_IDLE policy where the OS has it) and on one thread: the child
never holds this process's GIL or its torch threads, and the kernel gives a visitor's request the
CPU whenever it wants it. The child writes
to the same disk cache the app reads (`spiq.quantize.distill.cache_dir`), so when it exits the
fit is ready for everyone. No Gradio here: the handlers read `state`.

The children end with the server. Each leads its own process group, which `stop` (and
`stop_all`, on any exit the server sees) kills whole. And each gets SIGTERM from the kernel when the
thread that started it ends (Linux's parent-death signal), which covers a server killed by SIGKILL
or the OOM killer: that thread waits on the child, so it never ends first while the server lives.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

QUEUED, RUNNING, READY, FAILED = "queued", "running", "ready", "failed"
NICE = 19
# A child that hangs (a download stalled on a Space) must not hold the queue for ever.
TIMEOUT_S = 3600
STOP_WAIT_S = 2   # what a stopped child gets to end on SIGTERM before SIGKILL
_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: loading a library between fork and exec can deadlock.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_started: weakref.WeakSet[BackgroundDistiller] = weakref.WeakSet()


@dataclass
class Job:
    name: str
    state: str = QUEUED
    message: str = ""   # the child's last error line when it failed


def distill_command(name: str) -> list[str]:
    return [sys.executable, "-m", "spiq", "distill", "--model", name]


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:   # runs in the child, before exec
        _die_with_parent(parent)
        _lowest_priority()
    return setup


def _die_with_parent(parent: int) -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:   # the server died before the prctl, so nobody will send the signal
        os._exit(1)


def _lowest_priority() -> None:
    os.nice(NICE)
    # SCHED_IDLE: the child runs only on a core nothing else wants, and gives it back as soon as a
    # visitor's thread wakes up, rather than at the end of its time slice.
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class BackgroundDistiller:
    """Runs `command(name)` for each name in turn, in a thread, children at the lowest priority on one thread."""

    def __init__(self, command: Callable[[str], list[str]] = distill_command):
        self.jobs: dict[str, Job] = {}
        self.command = command
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()   # a child is never started after `stop` looked for one

    def start(self, names: list[str]) -> threading.Thread:
        self.jobs = {n: Job(n) for n in names}
        _started.add(self)
        self._thread = threading.Thread(target=self._run, name="spiq-background-distill", daemon=True)
        self._thread.start()
        return self._thread

    def state(self, name: str) -> Job | None:
        """The job of `name`, or None if it is not distilled in the background."""
        return self.jobs.get(name)

    def pending(self, name: str) -> bool:
        job = self.jobs.get(name)
        return job is not None and job.state in (QUEUED, RUNNING)

    def stop(self) -> None:
        """No further child; the running one's process group is ended (SIGTERM, then SIGKILL)."""
        with self._lock:
            self._stopped = True
            child = self._child
        if child is not None:
            _end_group(child)

    def _run(self) -> None:
        for job in list(self.jobs.values()):
            if self._stopped:
                return
            job.state = RUNNING
            job.state, job.message = self._distill(job.name)

    def _distill(self, name: str) -> tuple[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            with self._lock:
                if self._stopped:
                    return FAILED, "stopped"
                self._child = subprocess.Popen(self.command(name), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               text=True, env=env, start_new_session=True,
                                               preexec_fn=_child_setup(os.getpid()))
            _, err = self._child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _end_group(self._child, wait_s=0)
            self._child.communicate()
            return FAILED, f"gave up after {TIMEOUT_S // 60} min"
        except OSError as exc:
            return FAILED, f"could not start: {exc.strerror or exc}"
        if self._child.returncode == 0:
            return READY, ""
        # the one-line error every spiq verb ends with, not the progress bar's last frame
        errors = [line for line in err.splitlines() if line.startswith("spiq: error:")]
        return FAILED, errors[-1].removeprefix("spiq: error:").strip() if errors else f"exit code {self._child.returncode}"


def _end_group(child: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM to the child's process group (grandchildren too), SIGKILL if it lives `wait_s` on.
    Only while the child is unreaped: until then its pid, the group's id, is not reused."""
    for sig in (signal.SIGTERM, signal.SIGKILL) if wait_s else (signal.SIGKILL,):
        if child.poll() is not None:
            return
        try:
            os.killpg(child.pid, sig)
            child.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def stop_all() -> None:
    """Stop every distiller started in this process: what the server does before it exits."""
    for distiller in list(_started):
        distiller.stop()


atexit.register(stop_all)
