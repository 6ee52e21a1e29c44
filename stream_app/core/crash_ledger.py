"""Which records were inside native code when the process died, and how often: poison-record detection.

Exceptions that belong to one record are dead-lettered where they happen. What cannot be caught is a
process that dies inside native code (a tokenizer or ONNX Runtime abort, a segfault, the kernel's OOM
killer): its offsets are never committed, so every restart would meet the same record and die again. The
ledger breaks that loop:

* before native work on some records (tokenising a chunk, inferring a batch) their coordinates are
  written to a small file, and cleared after the work returns;
* at start-up, coordinates still in the file were in flight when the previous process died: each gets
  one more strike in a bounded table of counts, kept in the same file;
* a suspect (a record with strikes) is processed alone, so the innocent records that shared its batch
  clear their strikes; a record with ``max_strikes`` strikes is dead-lettered (reason ``crash_loop``)
  without being processed again.

The file is rewritten in place with ``os.pwrite`` (no fsync: it must survive the death of the process,
which the page cache ensures, not of the machine). Coordinates are ``(topic, partition, offset)``; in the
file, records in flight are runs ``[topic, partition, first, last]`` (a chunk is a few runs, so a write
costs the same for 10 records as for 2,000).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Coordinates", "CrashLedger"]

_log = logging.getLogger(__name__)

Coordinates = tuple[str, int, int]


class CrashLedger:
    """Write-ahead record of native work, with per-record crash strikes.

    Args:
        path: The ledger file (in the worker's state folder; one per worker).
        max_strikes: Crashes after which a record is dead-lettered instead of processed.
        max_entries: Bound of the strike table; the oldest entries go first beyond it.
    """

    def __init__(self, path: Path, *, max_strikes: int = 3, max_entries: int = 10_000) -> None:
        if max_strikes < 1:
            raise ValueError(f"max_strikes must be >= 1, got {max_strikes}")
        self.path = path
        self.max_strikes = max_strikes
        self.max_entries = max_entries
        self._strikes: dict[Coordinates, int] = {}
        self._in_flight: dict[int, tuple[Coordinates, ...]] = {}
        self._next_token = 0
        self._fd: int | None = None
        self._lock = threading.Lock()  # begin/end run in the tokenizer and inference threads
        self._recover()

    # ------------------------------------------------------------------ start-up
    def _recover(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as exc:
            _log.warning("crash ledger %s unreadable, starting a new one: %r", self.path, exc)
            doc = {}
        strikes: dict[Coordinates, int] = {}
        for item in doc.get("strikes", []):
            try:
                topic, partition, offset, count = item
                strikes[(str(topic), int(partition), int(offset))] = int(count)
            except (TypeError, ValueError):
                continue
        crashed = 0
        for item in doc.get("in_flight", []):
            try:
                topic, partition, first, last = item
                span = range(int(first), int(last) + 1)
            except (TypeError, ValueError):
                continue
            for offset in span[: self.max_entries]:
                coords = (str(topic), int(partition), offset)
                strikes[coords] = strikes.get(coords, 0) + 1
                crashed += 1
        self._strikes = strikes
        self._trim()
        if crashed:
            _log.warning(
                "the previous process died with %d record(s) in native code; they are processed alone now "
                "and dead-lettered after %d crashes",
                crashed,
                self.max_strikes,
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._write()

    # ------------------------------------------------------------------ queries
    def strikes(self, coords: Coordinates) -> int:
        """Crashes this record was part of so far."""
        return self._strikes.get(coords, 0)

    def is_poison(self, coords: Coordinates) -> bool:
        """The record crashed the worker ``max_strikes`` times: dead-letter it."""
        return self._strikes.get(coords, 0) >= self.max_strikes

    @property
    def has_suspects(self) -> bool:
        return bool(self._strikes)

    # ------------------------------------------------------------------ native work
    def begin(self, coords: Iterable[Coordinates]) -> int:
        """Record that native work on ``coords`` starts; returns a token for :meth:`end` (thread-safe)."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._in_flight[token] = tuple(coords)
            self._write()
        return token

    def end(self, token: int, *, succeeded: Iterable[Coordinates] = ()) -> None:
        """The work of ``token`` returned; ``succeeded`` records lose their strikes (thread-safe)."""
        with self._lock:
            self._in_flight.pop(token, None)
            for coords in succeeded:
                self._strikes.pop(coords, None)
            self._write()

    def forget(self, coords: Iterable[Coordinates]) -> None:
        """Drop the strikes of records that were dealt with (dead-lettered as poison)."""
        with self._lock:
            for c in coords:
                self._strikes.pop(c, None)
            self._write()

    def close(self) -> None:
        """Clean shutdown: nothing is in flight any more."""
        with self._lock:
            self._in_flight.clear()
            self._write()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ------------------------------------------------------------------ file
    def _trim(self) -> None:
        excess = len(self._strikes) - self.max_entries
        if excess > 0:
            for key in list(self._strikes)[:excess]:
                del self._strikes[key]

    def _write(self) -> None:
        if self._fd is None:
            return
        in_flight = _ranges(c for coords in self._in_flight.values() for c in coords)
        strikes = [[*c, n] for c, n in self._strikes.items()]
        data = json.dumps({"in_flight": in_flight, "strikes": strikes}, separators=(",", ":")).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


def _ranges(coords: Iterable[Coordinates]) -> list[list[str | int]]:
    """Coordinates as ``[topic, partition, first, last]`` runs of consecutive offsets (a chunk is a few)."""
    out: list[list[str | int]] = []
    for topic, partition, offset in sorted(coords):
        if out and out[-1][0] == topic and out[-1][1] == partition and out[-1][3] == offset - 1:
            out[-1][3] = offset
        else:
            out.append([topic, partition, offset, offset])
    return out
