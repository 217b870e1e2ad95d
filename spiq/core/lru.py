"""The one bounded least-recently-used store: the quantization memo and the app's caches use it."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most `maxsize` values (None: unbounded), the least recently used dropped first.

    Keys for which `keep(key)` is true are never dropped (they do not count towards `maxsize`);
    `on_drop(key)` runs for each key dropped. Not thread-safe: its owner holds its own lock.
    """

    def __init__(self, maxsize: int | None = None, keep: Callable[[Hashable], bool] | None = None,
                 on_drop: Callable[[Hashable], None] | None = None):
        if maxsize is not None and maxsize < 0:
            raise ValueError(f"maxsize must be at least 0, got {maxsize}")
        self.maxsize = maxsize
        self._keep = keep
        self._on_drop = on_drop
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first."""
        return iter(list(self._items))

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        """The value of `key` (now the most recently used), or `default`."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def __getitem__(self, key: Hashable) -> V:
        if key not in self._items:
            raise KeyError(key)
        return self.get(key)

    def __setitem__(self, key: Hashable, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._trim()

    def make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of `key`, made by `make()` and kept if it is not here."""
        if key not in self._items:
            self[key] = make()
        return self.get(key)

    def pop(self, key: Hashable, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget every key for which `keep(key)` is false."""
        for key in [k for k in list(self._items) if not keep(k)]:   # list(): one step under the GIL
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def _trim(self) -> None:
        if self.maxsize is None:
            return
        keep = self._keep or (lambda key: False)
        while (len(self._items) if self._keep is None else sum(not keep(k) for k in self._items)) > self.maxsize:
            gone = next(k for k in self._items if not keep(k))
            del self._items[gone]
            if self._on_drop is not None:
                self._on_drop(gone)
