"""Bounded scratch folders for files a server hands out (recipes, exported models): one entry per
key, written once and reused, the oldest deleted past a count, all deleted when the process ends."""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path


class ScratchDir:
    def __init__(self, prefix: str, max_entries: int):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.max_entries = max_entries
        self._lock = threading.Lock()
        atexit.register(self.cleanup)

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
