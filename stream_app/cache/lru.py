"""L1: an in-process LRU of results with a time-to-live per entry.

Not thread-safe: it is used from the event loop thread only (lookups before batching, fills after the
engine's result is back on the loop), which is what lets it skip locking.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TtlLru"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """Bounded LRU whose entries also expire.

    ``get`` refreshes an entry's recency but not its expiry: a popular entry is still recomputed once per
    TTL, so a model or data fix reaches it. An expired entry is a miss and is removed when touched;
    :meth:`sweep` removes the untouched ones. All operations are O(1) except :meth:`sweep`.

    Args:
        max_entries: Most entries; inserting beyond it evicts the least recently used.
        ttl_s: Default lifetime of an entry in seconds.
        clock: Monotonic clock in seconds (injected for tests).
    """

    def __init__(self, *, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if not (ttl_s > 0 and not math.isnan(ttl_s)):
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def ttl_s(self) -> float:
        return self._ttl

    def __len__(self) -> int:
        """Entries held, expired ones not yet removed included."""
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key`` (now most recently used), or None on a miss or expiry."""
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        value, expires_at = entry
        if self._clock() >= expires_at:
            del self._data[key]
            self.expirations += 1
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V, ttl_s: float | None = None) -> None:
        """Insert or replace ``key`` (a replacement gets a fresh expiry), evicting the LRU if full."""
        ttl = self._ttl if ttl_s is None else ttl_s
        data = self._data
        data[key] = (value, self._clock() + ttl)
        data.move_to_end(key)
        if len(data) > self._max:
            data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: K) -> V | None:
        """Remove ``key``; its value if it was held and live."""
        entry = self._data.pop(key, None)
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0]

    def sweep(self) -> int:
        """Remove every expired entry (O(n); for a periodic timer); returns how many."""
        now = self._clock()
        dead = [k for k, (_, expires_at) in self._data.items() if now >= expires_at]
        for k in dead:
            del self._data[k]
        self.expirations += len(dead)
        return len(dead)

    def clear(self) -> None:
        """Drop everything (e.g. when the model changes); counters are kept."""
        self._data.clear()
