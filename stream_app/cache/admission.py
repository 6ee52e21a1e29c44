"""L2 admission: keep one-off texts out of the RocksDB table.

Most chat messages are seen once; writing each to L2 costs a RocksDB write plus a changelog record and
pushes popular entries out. :class:`SecondSightingAdmission` admits a key only on its second sighting
within a window, using a doorkeeper (TinyLFU's first stage): two Bloom-filter generations of fixed size.
Keys are recorded in the current generation; after ``capacity`` recordings (or ``window_s`` seconds) the
current generation becomes the previous one and a fresh one starts, so a first sighting is remembered for
between one and two windows and memory never grows.

A false positive (about 1-2 % at the designed load) admits a one-off text: harmless. There are no false
negatives within the window. Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Admission", "AlwaysAdmit", "SecondSightingAdmission"]

_HASHES = 4  # 4 x 32-bit probes from one 16-byte BLAKE2b digest
_BITS_PER_KEY = 10  # with 4 probes: about 1.2 % false positives per generation at `capacity` keys


class Admission(Protocol):
    """Decides whether a result may be written to L2."""

    def admit(self, key: bytes) -> bool: ...


class AlwaysAdmit:
    """Admit everything (``cache.admission = always``)."""

    def admit(self, key: bytes) -> bool:
        return True


class SecondSightingAdmission:
    """Admit a key on its second sighting within the window.

    Args:
        capacity: Distinct keys remembered per generation; memory is two filters of ``10 x capacity``
            bits each, rounded up to a power of two (under ``5 x capacity`` bytes in all).
        window_s: Also start a new generation after this many seconds (None: by count only).
        clock: Monotonic clock in seconds, used only with ``window_s``.
    """

    def __init__(
        self,
        capacity: int,
        *,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if window_s is not None and not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive number, got {window_s}")
        bits = 1 << max(6, (capacity * _BITS_PER_KEY - 1).bit_length())  # power of two: mask, not modulo
        self._mask = bits - 1
        self._current = bytearray(bits // 8)
        self._previous = bytearray(bits // 8)
        self._capacity = capacity
        self._recorded = 0
        self._window_s = window_s
        self._clock = clock
        self._generation_started = clock()
        self.rotations = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the two filters; fixed at construction."""
        return len(self._current) + len(self._previous)

    def admit(self, key: bytes) -> bool:
        """Record a sighting of ``key``; True when it was already seen within the window."""
        self._maybe_rotate()
        digest = hashlib.blake2b(key, digest_size=4 * _HASHES).digest()
        probes = [int.from_bytes(digest[i : i + 4], "little") & self._mask for i in range(0, 4 * _HASHES, 4)]
        cur, prev = self._current, self._previous
        in_cur = all(cur[p >> 3] & (1 << (p & 7)) for p in probes)
        if in_cur:
            return True
        seen = all(prev[p >> 3] & (1 << (p & 7)) for p in probes)
        # Recording a previous-generation key again keeps a popular key alive across rotations.
        for p in probes:
            cur[p >> 3] |= 1 << (p & 7)
        self._recorded += 1
        return seen

    def _maybe_rotate(self) -> None:
        expired = self._window_s is not None and self._clock() - self._generation_started >= self._window_s
        if self._recorded >= self._capacity or expired:
            self._previous = self._current
            self._current = bytearray(len(self._previous))
            self._recorded = 0
            self._generation_started = self._clock()
            self.rotations += 1
