"""How the server ends: on SIGTERM or SIGINT (Ctrl-C) it stops its background children, deletes its
scratch folder and exits at once, with status 0.

Why not the usual exit: SIGTERM's default action runs no cleanup at all (the scratch stays, the
children go on under PID 1). Ctrl-C makes Gradio's `launch()` return, and the interpreter then tears
down while daemon threads (the warm-up, requests in flight) and torch's C++ threads still run, which
usually aborts with "terminate called without an active exception". `os._exit` after the cleanup
skips that teardown.

A SIGKILL or the OOM killer cannot be caught: the children still die with the server
(`spiq.ui.background`), and the next process sweeps the scratch folder (`spiq.ui.scratch`).
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from spiq.ui import background, scratch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install() -> None:
    """Handle SIGTERM and SIGINT with `on_signal`, and keep the process's temporary files in its
    scratch folder. Call it from the main thread, before serving."""
    temporaries_in_scratch()
    for sig in SIGNALS:
        # A process started with SIGINT ignored (nohup, `cmd &` in a script) keeps it ignored, as Python does.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)


def temporaries_in_scratch() -> None:
    """Point `tempfile` at the scratch folder: what libraries write there during a request (ONNX
    Runtime's calibration copy of a model, the export check's probe graph: tens of MB each) is then
    swept after a kill too. Gradio's upload folder stays where Gradio's default puts it."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str((Path(tempfile.gettempdir()) / "gradio").resolve()))
    tempfile.tempdir = str(scratch.process_root())


def shutdown() -> None:
    """Stop the background children and delete the scratch folder: what exiting on a signal does."""
    background.stop_all()
    scratch.remove_process_root()


def on_signal(signum: int, frame=None) -> None:
    # A second Ctrl-C while the children are stopped must not cut the cleanup short.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        _quietly(lambda: print(f"{signal.Signals(signum).name}: stopping the server.", file=sys.stderr))
        shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            _quietly(stream.flush)
        os._exit(0)


def _quietly(write) -> None:
    try:
        write()
    except (OSError, ValueError):   # a closed pipe or stream: the exit must not depend on it
        pass
