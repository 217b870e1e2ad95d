"""Bounded scratch folders for files a server hands out (recipes, exported models): one entry per
key, written once and reused, the oldest deleted past a count.

Every scratch folder of a process lives in one folder of its own, `<tempdir>/spiq-<pid>-<start>-*`
(`start`, the process's start time, tells a reused pid apart). A normal exit deletes it, and so do
SIGTERM and SIGINT in the app (`spiq.ui.lifecycle`). Nothing runs on a SIGKILL or the OOM killer, so
the first scratch folder a process makes sweeps every other process folder whose owner is dead.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

PREFIX = "spiq-"
_OWNED = re.compile(rf"{PREFIX}(\d+)-(\d+)-\w+")
_lock = threading.Lock()
_roots: dict[int, Path] = {}   # by pid: a forked child must not take (or delete) its parent's


def start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot ("0" without /proc); None if it is gone."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:   # someone else's: alive
            pass
        return "0"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22; the command name before ")" may hold spaces


def sweep(base: Path) -> list[Path]:
    """Delete the process folders in `base` whose owner is dead; returns them."""
    gone = []
    for folder in base.glob(f"{PREFIX}*"):
        owner = _OWNED.fullmatch(folder.name)
        if owner and not folder.is_symlink() and folder.is_dir() and start_time(int(owner[1])) != owner[2]:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def process_root() -> Path:
    """This process's scratch folder, made on first use (after sweeping the dead owners' ones)."""
    pid = os.getpid()
    with _lock:
        if pid not in _roots:
            base = Path(tempfile.gettempdir())
            sweep(base)
            # mkdtemp, not a fixed name: in a shared /tmp nobody else can make it first
            _roots[pid] = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{start_time(pid)}-", dir=base))
            atexit.register(remove_process_root)
        return _roots[pid]


def remove_process_root() -> None:
    """Delete this process's scratch folder, if it made one."""
    root = _roots.get(os.getpid())
    for _ in range(3):   # a request thread may write a file while the tree is deleted
        if root is None or not root.exists():
            return
        shutil.rmtree(root, ignore_errors=True)


class ScratchDir:
    def __init__(self, prefix: str, max_entries: int):
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=process_root()))
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def entry(self, key: str) -> Path:
        """The folder for `key` (made if new), marked as the newest; the oldest beyond
        `max_entries` are deleted. A key is a file-name-safe digest or name, never user text."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"not a scratch key: {key!r}")
        with self._lock:
            folder = self.root / key
            folder.mkdir(exist_ok=True)
            folder.touch()   # the mtime orders entries by last use
            entries = sorted((p for p in self.root.iterdir() if p != folder), key=lambda p: p.stat().st_mtime)
            for old in entries[: max(0, len(entries) - self.max_entries + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return folder

    def size(self) -> int:
        """Bytes held now."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
