"""`LRUMemo`: a bounded, thread-safe memo for pure results that are asked for again and again.

Two places use one: the privacy detectors (`find` and `pending` per detector configuration and
text: fused decoding screens the same prompts and prefixes at every compared method and every
rerun of a query; `floe_jax.inference.privacy.span.memoised`) and the cloud server's engine (a
prompt's next-token log-probs, `floe_jax.inference.server.prompt_memo`: greedy fused decoding
asks for the same prefixes just as often). Entries are sized by the caller (characters,
bytes) and the least recently used are dropped past `max_size`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable

_MISSING = object()


class LRUMemo:
    """Values under hashable keys, at most `max_size` in all (each `put` says its entry's size);
    the least recently used go first. Values must not be mutated once stored."""

    def __init__(self, max_size: int):
        if max_size < 0:
            raise ValueError(f"LRUMemo max_size must be >= 0, got {max_size}")
        self.max_size = max_size
        self.size = 0
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0

    def get(self, key: Hashable, default=None):
        with self._lock:
            value = self._items.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._items.move_to_end(key)
            return value[0]

    def put(self, key: Hashable, value, size: int) -> None:
        """Stores `value` (nothing when it alone is larger than `max_size`)."""
        if size > self.max_size:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._items[key] = (value, size)
            self.size += size
            while self.size > self.max_size:
                _, (_, dropped) = self._items.popitem(last=False)
                self.size -= dropped

    def get_or(self, key: Hashable, compute: Callable[[], object], size: int):
        """The value under `key`, else `compute()`, stored with `size`. `compute` runs outside
        the lock: threads missing the same key at once may each compute it (pure results)."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = compute()
            self.put(key, value, size)
        return value
