"""The pipeline: a fetched chunk goes through intake, the cache, the classifier and the emitter.

```
feed(topic, {partition: records})          (waits while max_in_flight messages are unacknowledged)
  └─ per partition: offset check (reset / re-delivery) ─► Intake ─► lane window (delivery order)
  └─ rejected ─────────────────────────────────────────────────┐
  └─ valid ─► poison check (crash ledger) ─► ResultCache.lookup ┤ hits
                                              │ misses           ▼
                                              └► Classifier ─► Emitter.complete ─► flush ─► Sink
                                                                           broker acks ─► committable offsets
```

The worker (``stream_app.worker``) drives it: it feeds fetched chunks, tells it about assignments and
revocations, commits :meth:`Pipeline.committable` offsets, and stops the process when ``on_fatal`` is
called. Nothing here knows about Faust or a Kafka client; the unit tests and the host-ceiling benchmark
drive it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream_app.cache.tiered import ResultCache
from stream_app.core.classifier import Classifier, ClassifierConfig
from stream_app.core.crash_ledger import CrashLedger
from stream_app.core.emitter import Emitter, EmitterConfig, Sink
from stream_app.core.intake import Intake
from stream_app.core.slots import ChunkInfo, DeadInfo, Lane, RecordLike, Slot
from stream_app.errors import EmotionStreamError
from stream_app.inference.base import Engine
from stream_app.inference.tokenize import TextEncoder
from stream_app.metrics import Metrics
from stream_app.records import rfc3339

if TYPE_CHECKING:
    from stream_app.tracing import BatchTracer

__all__ = ["Pipeline", "PoisonRecordError"]

_log = logging.getLogger(__name__)


class PoisonRecordError(EmotionStreamError):
    """The record was in native code each of the last ``max_strikes`` times the worker died."""


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """What lag needs to know of one partition: messages read and not acknowledged, the oldest one's time."""

    in_flight: int
    oldest_timestamp_ms: int | None
    caught_up_since: float | None


class Pipeline:
    """Feed chunks of records; outputs go to the sink in source order per partition.

    Args:
        engine, encoder: The model.
        sink: Where outputs go.
        intake: Decoding and validation.
        cache: The result cache (None: off).
        classifier_config, emitter_config: Their settings.
        max_in_flight: Most messages read and not yet acknowledged; :meth:`feed` waits beyond it.
        metrics: The worker's collectors.
        on_fatal: Called once with the error when the engine, device or broker is unusable.
        ledger: The crash ledger for poison records (None: off).
        clock, wall_clock: Injected time sources.
        tracer: Makes a span of each inference batch (None: tracing off).
    """

    def __init__(
        self,
        *,
        engine: Engine,
        encoder: TextEncoder,
        sink: Sink,
        intake: Intake,
        cache: ResultCache | None,
        classifier_config: ClassifierConfig,
        emitter_config: EmitterConfig,
        max_in_flight: int,
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None],
        ledger: CrashLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        tracer: BatchTracer | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.intake = intake
        self.cache = cache if cache is not None and cache.enabled else None
        self.metrics = metrics
        self.ledger = ledger
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_in_flight = max_in_flight
        self._on_fatal = on_fatal
        self.failed: BaseException | None = None
        self.classifier = Classifier(
            engine=engine,
            encoder=encoder,
            config=classifier_config,
            metrics=metrics,
            on_done=self._on_classified,
            on_fatal=self._fatal,
            ledger=ledger,
            clock=clock,
            tracer=tracer,
        )
        self.emitter = Emitter(
            sink=sink,
            config=emitter_config,
            metrics=metrics,
            on_acked=self._on_acked,
            on_fatal=self._fatal,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._in_flight = 0
        self._space = asyncio.Event()
        self._acked = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._messages_total = metrics.messages_total
        self._decode_seconds = metrics.stage_seconds.labels("decode")
        self._cache_seconds = metrics.stage_seconds.labels("cache")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.classifier.start()
        await self.emitter.start()

    async def stop(self) -> None:
        await self.classifier.stop()
        await self.emitter.stop()
        if self.ledger is not None:
            self.ledger.close()

    def _fatal(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            _log.critical("pipeline failed, stopping without committing: %r", exc)
            self._space.set()
            self._on_fatal(exc)

    @property
    def in_flight(self) -> int:
        """Messages read and not yet acknowledged."""
        return self._in_flight

    async def drain(self, timeout_s: float) -> bool:
        """Wait until everything fed so far is acknowledged; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ partitions
    def assigned(self, committed: Mapping[int, int | None]) -> None:
        """New partitions: ``committed`` maps each to its committed offset (None when the group has none)."""
        for partition, offset in committed.items():
            lane = self.emitter.lane(partition)
            lane.committed_offset = offset
            lane.expected_offset = offset
            lane.caught_up_since = self.clock()

    async def revoke(self, partitions: Sequence[int], timeout_s: float) -> dict[int, int]:
        """Partitions are leaving: wait (bounded) for their in-flight work, drop them, return what to commit.

        Whatever is not acknowledged within ``timeout_s`` is abandoned uncommitted: the next owner reads it
        again (at-least-once).
        """
        lanes = [self.emitter.lanes[p] for p in partitions if p in self.emitter.lanes]
        for lane in lanes:
            lane.revoking = True
        deadline = self.clock() + timeout_s
        self.emitter.request_flush()
        while any(lane.window and not lane.dead for lane in lanes) and self.failed is None:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), remaining)
        # a transaction may still be in flight with nothing but stage records: let it finish before the
        # partitions' producers are closed
        await self.emitter.wait_transactions(partitions, max(0.0, deadline - self.clock()))
        final = {lane.partition: lane.acked_offset for lane in lanes if lane.acked_offset is not None}
        abandoned = self.emitter.drop(partitions)
        if abandoned:
            self._release(abandoned)
            _log.info("revoked partitions %s with %d message(s) unfinished; their next owner reads them again",
                      sorted(partitions), abandoned)  # fmt: skip
        return {p: o for p, o in final.items() if o is not None}

    def committable(self) -> dict[int, int]:
        """Offsets to commit now: per live lane, one past its last acknowledged slot, if that moved."""
        out: dict[int, int] = {}
        for p, lane in self.emitter.lanes.items():
            acked = lane.acked_offset
            if acked is not None and acked != lane.committed_offset:
                out[p] = acked
        return out

    def mark_committed(self, offsets: Mapping[int, int]) -> None:
        for p, offset in offsets.items():
            lane = self.emitter.lanes.get(p)
            if lane is not None:
                lane.committed_offset = offset

    def lane_status(self) -> dict[int, LaneStatus]:
        """Per live partition: in-flight count, the oldest in-flight record's timestamp, caught-up time."""
        out: dict[int, LaneStatus] = {}
        for p, lane in self.emitter.lanes.items():
            window = lane.window
            oldest = window[0].timestamp_ms if window else None
            out[p] = LaneStatus(len(window), oldest, lane.caught_up_since if not window else None)
        return out

    # ------------------------------------------------------------------ the hot path
    async def wait_for_space(self, n: int) -> None:
        """Wait while taking ``n`` more messages would exceed ``max_in_flight`` (returns at once when the
        pipeline failed). A caller that checks its partitions are still its own after this wait and then
        calls :meth:`feed` without yielding in between never feeds records of a partition revoked meanwhile.
        """
        while self._in_flight and self._in_flight + n > self.max_in_flight and self.failed is None:
            self._space.clear()
            await self._space.wait()

    async def feed(self, topic: str, batches: Mapping[int, Sequence[RecordLike]]) -> None:
        """Take one fetched chunk: records per partition, each list in offset order.

        Waits first while ``max_in_flight`` messages are unacknowledged (backpressure on the consumer).
        """
        n = sum(len(r) for r in batches.values())
        if n == 0:
            return
        await self.wait_for_space(n)
        if self.failed is not None:
            return
        t0 = self.clock()
        wall = self.wall_clock()
        chunk = ChunkInfo(topic=topic, received_wall=wall, received_mono=t0, received_at=rfc3339(wall))
        slots: list[Slot] = []
        accept = self.intake.accept
        n = 0
        for partition, delivered in batches.items():
            if not delivered:
                continue
            lane = self.emitter.lane(partition)
            records = self._not_taken(lane, delivered)
            if not records:
                continue
            n += len(records)
            lane_slots = accept(lane, records, chunk)
            lane.window.extend(lane_slots)
            lane.caught_up_since = None
            slots.extend(lane_slots)
        if n == 0:
            return
        self._in_flight += n
        self._idle.clear()
        self._messages_total.inc(n)
        t1 = self.clock()
        chunk.decode_s = t1 - t0
        self._decode_seconds.observe(chunk.decode_s)

        decided: list[Slot] = []
        valid: list[Slot] = []
        for s in slots:
            (decided if s.dead is not None else valid).append(s)
        if self.ledger is not None and self.ledger.has_suspects and valid:
            valid = self._screen_suspects(valid, decided)
        misses = valid
        if self.cache is not None and valid:
            misses = self.cache.lookup(valid)
            if len(misses) != len(valid):
                hits = self.classifier.hits_since_batch
                reject = self.intake.overlong_reject
                for s in valid:
                    if s.result is not None:
                        if reject and s.result.truncated:
                            # cached by a worker that truncated (another setting, before a restart, or
                            # another worker of the group): a miss, so the tokenizer rejects it as it
                            # would without the cache
                            s.result, s.level = None, "none"
                            misses.append(s)
                            continue
                        decided.append(s)
                        hits[s.level] = hits.get(s.level, 0) + 1
        chunk.cache_s = self.clock() - t1
        self._cache_seconds.observe(chunk.cache_s)
        if decided:
            self.emitter.complete(decided)
        if misses:
            self.classifier.submit(misses)

    def _screen_suspects(self, valid: list[Slot], decided: list[Slot]) -> list[Slot]:
        ledger = self.ledger
        assert ledger is not None
        keep: list[Slot] = []
        for s in valid:
            coords = (s.chunk.topic, s.lane.partition, s.offset)
            if ledger.is_poison(coords):
                error = PoisonRecordError(f"the worker died {ledger.strikes(coords)} times while processing it")
                s.dead = DeadInfo("crash_loop", "infer", error)
                decided.append(s)
                ledger.forget([coords])
                _log.warning("dead-lettering %s[%d]@%d: it was in native code at %d crashes", *coords,
                             ledger.max_strikes)  # fmt: skip
            else:
                if ledger.strikes(coords):
                    s.isolate = True
                keep.append(s)
        return keep

    def _not_taken(self, lane: Lane, records: Sequence[RecordLike]) -> Sequence[RecordLike]:
        """``records`` (one partition's, in offset order) without those this lane has taken already.

        A consumer can deliver offsets again within one assignment: Faust resumes the partitions before it
        seeks them to their committed offsets, so what was fetched in between comes again after the seek.
        Those records are in flight or acknowledged here; taking them again would emit them twice (and
        under exactly-once, commit both). A jump below everything this assignment took is an offset reset
        (e.g. to the log start when the committed offset was beyond the log end): processed, and counted.
        """
        first = records[0].offset
        expected = lane.expected_offset
        if expected is not None and first < expected:
            lowest = lane.lowest_seen
            if lowest is not None and first >= lowest:
                kept = [r for r in records if r.offset >= expected]
                _log.info("partition %d: offsets %d..%d delivered again (taken already); skipped",
                          lane.partition, first, min(records[-1].offset, expected - 1))  # fmt: skip
                records = kept
            else:
                self.metrics.offset_resets_total.labels(str(lane.partition)).inc()
                _log.warning("partition %d: offset reset from %d to %d; processing from %d (nothing skipped)",
                             lane.partition, expected, first, first)  # fmt: skip
            if not records:
                return records
            first = records[0].offset
        lane.expected_offset = records[-1].offset + 1
        if lane.lowest_seen is None or first < lane.lowest_seen:
            lane.lowest_seen = first
        return records

    def _on_classified(self, slots: list[Slot], stats: object) -> None:
        if self.cache is not None:
            fresh = [s for s in slots if s.result is not None and s.level == "none"]
            if fresh:
                self.cache.remember(fresh)
        self.emitter.complete(slots)

    def _on_acked(self, n: int) -> None:
        self._release(n)

    def _release(self, n: int) -> None:
        self._acked.set()
        self._in_flight -= n
        if self._in_flight <= 0:
            self._in_flight = 0
            self._idle.set()
        self._space.set()
