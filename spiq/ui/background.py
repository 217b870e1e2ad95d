"""Bias-fit images of the other models, distilled in the background after start, one model at a time.

Each model is distilled by `spiq distill --model NAME` in a child process at the lowest CPU
priority (nice 19, and the SCHED_IDLE policy where the OS has it) and on one thread: the child
never holds this process's GIL or its torch threads, and the kernel gives a visitor's request the
CPU whenever it wants it. The child writes
to the same disk cache the app reads (`spiq.quantize.distill.cache_dir`), so when it exits the
fit is ready for everyone. No Gradio here: the handlers read `state`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable

QUEUED, RUNNING, READY, FAILED = "queued", "running", "ready", "failed"
NICE = 19
# A child that hangs (a download stalled on a Space) must not hold the queue for ever.
TIMEOUT_S = 3600


@dataclass
class Job:
    name: str
    state: str = QUEUED
    message: str = ""   # the child's last error line when it failed


def distill_command(name: str) -> list[str]:
    return [sys.executable, "-m", "spiq", "distill", "--model", name]


def _lowest_priority() -> None:   # runs in the child, before exec
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

    def start(self, names: list[str]) -> threading.Thread:
        self.jobs = {n: Job(n) for n in names}
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
        self._stopped = True
        if self._child is not None and self._child.poll() is None:
            self._child.kill()

    def _run(self) -> None:
        for job in list(self.jobs.values()):
            if self._stopped:
                return
            job.state = RUNNING
            job.state, job.message = self._distill(job.name)

    def _distill(self, name: str) -> tuple[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            self._child = subprocess.Popen(self.command(name), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True, env=env, preexec_fn=_lowest_priority)
            _, err = self._child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.communicate()
            return FAILED, f"gave up after {TIMEOUT_S // 60} min"
        except OSError as exc:
            return FAILED, f"could not start: {exc.strerror or exc}"
        if self._child.returncode == 0:
            return READY, ""
        # the one-line error every spiq verb ends with, not the progress bar's last frame
        errors = [line for line in err.splitlines() if line.startswith("spiq: error:")]
        return FAILED, errors[-1].removeprefix("spiq: error:").strip() if errors else f"exit code {self._child.returncode}"
