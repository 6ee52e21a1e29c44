"""The result cache facade: L1 (in-process TTL LRU) in front of an L2 store, with L2 admission.

All cache policy lives here: what is looked up where, what is written back, which entries are admitted
to L2, how expiry is checked and what is counted. The L2 store is a protocol (:class:`L2Store`); the
worker implements it over its RocksDB-backed Faust table (one store per input partition, co-partitioned
with the input), the tests with a dict.

Work is per chunk: :meth:`ResultCache.lookup` answers a list of slots (counting hits and misses once per
chunk), :meth:`ResultCache.remember` writes a list of fresh results back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from stream_app.cache.admission import Admission
from stream_app.cache.codec import CachedResult, decode, encode
from stream_app.cache.lru import TtlLru
from stream_app.core.slots import Result, Slot
from stream_app.metrics import Metrics

__all__ = ["L1Entry", "L2Store", "ResultCache", "SweepPlan", "SweepPlanner", "plan_sweep"]

_log = logging.getLogger(__name__)


class L2Store(Protocol):
    """A partitioned byte store whose writes reach a changelog (the worker's Faust table)."""

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored values of ``keys`` in ``partition`` (None where absent or the partition is not here)."""
        ...

    def put(self, partition: int, key: bytes, value: bytes) -> bool:
        """Store ``value``; False when ``partition`` has no store on this worker (the write is skipped)."""
        ...


@dataclass(eq=False, slots=True)
class L1Entry:
    """An L1 value: the result, and the partitions whose L2 already holds it (so it is promoted once)."""

    result: Result
    l2_partitions: set[int] = field(default_factory=set)


class ResultCache:
    """L1 then L2 lookups, and write-back with admission.

    Args:
        l1: The in-process LRU, or None when L1 is off.
        l2: The L2 store, or None when L2 is off.
        admission: Decides which results are written to L2 (None: all). Only consulted with an L2.
        l2_ttl_s: Lifetime of an L2 entry in seconds; entries carry their expiry (wall clock).
        n_labels: Score count of the current model; an L2 value with another count is a miss.
        metrics: Lookup and error counters.
        wall_clock: Unix seconds (injected in tests).
    """

    def __init__(
        self,
        *,
        l1: TtlLru[bytes, L1Entry] | None,
        l2: L2Store | None,
        admission: Admission | None,
        l2_ttl_s: float,
        n_labels: int,
        metrics: Metrics,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.admission = admission if l2 is not None else None
        self.l2_ttl_s = l2_ttl_s
        self.n_labels = n_labels
        self.metrics = metrics
        self.wall_clock = wall_clock
        self._l1_hit = metrics.cache_lookups_total.labels("l1", "hit")
        self._l1_miss = metrics.cache_lookups_total.labels("l1", "miss")
        self._l2_hit = metrics.cache_lookups_total.labels("l2", "hit")
        self._l2_miss = metrics.cache_lookups_total.labels("l2", "miss")
        self._l2_errors = metrics.errors_total.labels("cache")

    @property
    def enabled(self) -> bool:
        return self.l1 is not None or self.l2 is not None

    def lookup(self, slots: Sequence[Slot]) -> list[Slot]:
        """Answer what the caches hold; returns the slots still to infer.

        ``slots`` are valid slots with a ``cache_key`` (intake's accepted ones). A hit sets ``result`` and
        ``level`` (``l1`` or ``l2``). An L2 value that cannot be decoded, is expired or was written for
        another label count is a miss (and an L2 store error is counted and treated as misses: the cache
        can only make the worker faster, never stop it).
        """
        if not slots:
            return []
        misses: list[Slot] = list(slots)
        admission = self.admission
        promote: list[Slot] = []
        if self.l1 is not None:
            get = self.l1.get
            still: list[Slot] = []
            for s in misses:
                key = s.cache_key
                assert key is not None
                entry = get(key)
                if entry is None:
                    still.append(s)
                    continue
                s.result = entry.result
                s.level = "l1"
                # L1 is shared by every partition: promote a popular text into this partition's L2 once
                if admission is not None and s.lane.partition not in entry.l2_partitions and admission.admit(key):
                    promote.append(s)
            hits = len(misses) - len(still)
            if hits:
                self._l1_hit.inc(hits)
            if still:
                self._l1_miss.inc(len(still))
            misses = still
        if promote:
            self._write_l2(promote)
        if self.l2 is not None and misses:
            misses = self._lookup_l2(misses)
        return misses

    def _lookup_l2(self, slots: list[Slot]) -> list[Slot]:
        assert self.l2 is not None
        now = self.wall_clock()
        by_partition: dict[int, list[Slot]] = {}
        for s in slots:
            by_partition.setdefault(s.lane.partition, []).append(s)
        misses: list[Slot] = []
        hits = 0
        for partition, group in by_partition.items():
            keys = [s.cache_key for s in group]
            try:
                values = self.l2.get_many(partition, keys)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 -- a failing cache is a slower worker, never a stopped one
                self._l2_errors.inc()
                _log.warning("L2 lookup failed in partition %d, treating as misses: %r", partition, exc)
                misses.extend(group)
                continue
            for s, raw in zip(group, values, strict=True):
                found = self._decode(raw, now)
                if found is None:
                    misses.append(s)
                    continue
                s.result = found
                s.level = "l2"
                hits += 1
                if self.l1 is not None:
                    assert s.cache_key is not None
                    self.l1.put(s.cache_key, L1Entry(found, {partition}))
        if hits:
            self._l2_hit.inc(hits)
        if misses:
            self._l2_miss.inc(len(misses))
        # admission counts sightings of what is about to be inferred (written back in remember())
        return misses

    def _decode(self, raw: bytes | None, now: float) -> Result | None:
        if raw is None:
            return None
        try:
            value = decode(raw, n_labels=self.n_labels)
        except ValueError:
            return None
        if value.expires_at <= now:
            return None
        return Result(value.label_index, tuple(value.scores.tolist()), value.truncated)

    def remember(self, slots: Sequence[Slot]) -> None:
        """Write freshly inferred results back: every one to L1, the admitted ones to L2."""
        l1 = self.l1
        admission = self.admission
        to_l2: list[Slot] = []
        for s in slots:
            key = s.cache_key
            result = s.result
            if key is None or result is None:
                continue
            entry = L1Entry(result)
            if l1 is not None:
                l1.put(key, entry)
            if self.l2 is not None and (admission is None or admission.admit(key)):
                to_l2.append(s)
        if to_l2:
            self._write_l2(to_l2)

    def _write_l2(self, slots: list[Slot]) -> None:
        assert self.l2 is not None
        expires = self.wall_clock() + self.l2_ttl_s
        l1 = self.l1
        for s in slots:
            result = s.result
            key = s.cache_key
            assert result is not None and key is not None
            partition = s.lane.partition
            try:
                value = encode(
                    CachedResult(
                        result.label_index, np.asarray(result.scores, dtype=np.float32), expires, result.truncated
                    )
                )
                stored = self.l2.put(partition, key, value)
            except Exception as exc:  # noqa: BLE001 -- see _lookup_l2: the cache never stops the worker
                self._l2_errors.inc()
                _log.warning("L2 write failed in partition %d: %r", partition, exc)
                continue
            if stored and l1 is not None:
                entry = l1.get(key)
                if entry is not None:
                    entry.l2_partitions.add(partition)


class SweepPlan(NamedTuple):
    """What to delete from one L2 partition, by reason, and how many entries stay."""

    expired: list[bytes]
    size: list[bytes]
    kept: int


class SweepPlanner:
    """Builds a :class:`SweepPlan` from one L2 partition's items, fed in slices so that the caller can
    yield to its event loop between them (a partition holds up to ``l2_max_entries_per_partition`` entries:
    scanning 200,000 at a few µs each in one go would stall the loop for about a second).

    Deletes go through the changelog as tombstones (the caller's job), so a rebuild from the changelog
    does not bring expired entries back, as RocksDB's own TTL (local only) would.
    """

    def __init__(self, *, now: float, max_entries: int) -> None:
        self.now = now
        self.max_entries = max_entries
        self._expired: list[bytes] = []
        self._live: list[tuple[float, bytes]] = []

    def add(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Take ``(key, encoded entry)`` pairs; an undecodable entry counts as expired."""
        now = self.now
        for key, raw in items:
            if key.startswith(b"__faust"):  # Faust's own bookkeeping (the persisted changelog offset)
                continue
            try:
                expires = decode(raw).expires_at
            except ValueError:
                self._expired.append(key)
                continue
            if expires <= now:
                self._expired.append(key)
            else:
                self._live.append((expires, key))

    def plan(self) -> SweepPlan:
        """The expired and undecodable keys, and the soonest-to-expire surplus beyond ``max_entries``."""
        live = self._live
        surplus: list[bytes] = []
        if len(live) > self.max_entries:
            live.sort()
            surplus = [key for _, key in live[: len(live) - self.max_entries]]
        return SweepPlan(self._expired, surplus, len(live) - len(surplus))


def plan_sweep(items: Iterable[tuple[bytes, bytes]], *, now: float, max_entries: int) -> SweepPlan:
    """:class:`SweepPlanner` over all of ``items`` at once."""
    planner = SweepPlanner(now=now, max_entries=max_entries)
    planner.add(items)
    return planner.plan()
