"""The emitter: build and encode outputs, release them in source order per partition, track broker acks.

```
complete(slots) ─► build event / dead letter (guarded per slot) ─► slot.done
        flusher ─► per lane, release done slots from the front of its window (delivery order)
                ─► one Sink.send per output topic (batched per output partition by the sink)
                ─► an AckGroup per flush; when every batch of a group is acknowledged, and every
                   earlier group too, each lane's acked offset moves past the group's last slot
```

Why groups complete in order: a lane's committable offset must only move past slots whose outputs are
durable, and slots are released in delivery order, so the groups (one per flush) are applied in the order
they were sent even when the broker acknowledges a later one first.

Failure: a batch the broker refused for something about its records (:class:`OutputRejectedError`) is
re-sent one record at a time; a record still refused becomes a reduced dead letter (``output_failed``,
without raw bytes). A refused dead letter, or any other produce failure, is the infrastructure's: the
worker stops without committing the group. Building an output that raises turns the slot into a dead
letter (``output_failed``); building its dead letter never raises (the reduced form is the floor).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

import orjson

from stream_app.core.classifier import BatchStats
from stream_app.core.headers import (
    EventHeaders,
    TraceContext,
    dead_letter_headers,
    event_source,
    headers_size,
    read_trace_context,
)
from stream_app.core.slots import DeadInfo, Lane, OutRecord, Slot
from stream_app.errors import InfrastructureError, OutputRejectedError
from stream_app.metrics import Metrics
from stream_app.records import (
    CacheCounts,
    DeadLetter,
    SourceRef,
    StageMetrics,
    StageMs,
    render_sent_at,
    rfc3339,
)

__all__ = ["AckGroup", "Emitter", "EmitterConfig", "ReleaseStage", "Sink", "StageOutput"]

_log = logging.getLogger(__name__)

_CACHE_DOCS = {level: {"hit": level != "none", "level": level} for level in ("l1", "l2", "batch", "none")}
# Bytes a record costs in a batch beyond its key, value and headers (varints, attributes, timestamps);
# Kafka's DefaultRecord overhead is at most 21 bytes plus 5 per header, rounded up generously.
_RECORD_OVERHEAD = 64


class Sink(Protocol):
    """Where outputs go (the worker's Kafka producer; a list in tests)."""

    async def send(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        """Queue ``records`` for ``topic``; returns, per produced batch, the indexes it holds and a future.

        Each future resolves to the batch's base offset (None when unknown) once the broker acknowledged it,
        and raises
        :class:`~stream_app.errors.OutputRejectedError` when the broker refused the batch for something
        about its records; any other exception means the broker side is broken.
        """
        ...


class TransactionalSink(Protocol):
    """Exactly-once output: one producer per input partition, whose transactions carry that partition's
    outputs and its consumed offsets (the worker's Kafka implementation fences a zombie owner through the
    partition's stable transactional id)."""

    async def begin(self, partition: int) -> None: ...

    async def send(
        self, partition: int, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        """Like :meth:`Sink.send`, inside ``partition``'s open transaction."""
        ...

    async def commit(self, partition: int, offset: int | None) -> None:
        """Add the input offset (next to read; None: no input consumed) to the transaction and commit it.

        Raises:
            Exception: the transaction could not be committed (fenced, timed out, broker gone).
        """
        ...

    async def abort(self, partition: int) -> None: ...


@dataclass(slots=True)
class StageOutput:
    """What a release stage adds to a flush: ``now`` with the slots' outputs, ``after`` once they are acked."""

    now: list[tuple[str, OutRecord]] = field(default_factory=list)
    after: list[tuple[str, OutRecord]] = field(default_factory=list)


class ReleaseStage(Protocol):
    """Work done on slots as they are released, in delivery order (e.g. conversation state)."""

    name: str

    def on_release(self, slots: Sequence[Slot], partition: int | None = None) -> StageOutput:
        """Called with every flush's released slots (possibly none: a chance to send pending records).

        ``partition``: with exactly-once output the emitter releases one input partition at a time, and
        the stage returns only records of that partition's transaction (None: all partitions at once).
        """
        ...

    def on_after_acked(self, topic: str, partition: int, records: Sequence[OutRecord], last_offset: int) -> None:
        """A batch of ``after`` records (all in ``partition``) was acknowledged, the last at ``last_offset``."""
        ...


@dataclass(frozen=True)
class EmitterConfig:
    """Plain values the emitter needs.

    Attributes:
        events_topic, dead_letters_topic, metrics_topic: Output topics.
        worker_id: Written into dead letters and stage metrics.
        labels: The model's label names, in score order.
        model: The ``model`` object of every event (name, version, runtime, precision, device).
        engine: Engine label for stage metrics (e.g. ``onnx-int8``).
        max_record_bytes: The producer's ``max_request_size``: an output larger than this (with its key,
            headers and record overhead) cannot be sent and is replaced by a dead letter.
        max_raw_bytes: Most raw value bytes a dead letter copies.
    """

    events_topic: str
    dead_letters_topic: str
    metrics_topic: str
    worker_id: str
    labels: tuple[str, ...]
    model: dict[str, str]
    engine: str
    max_record_bytes: int = 1 << 20
    max_raw_bytes: int = 256 * 1024


@dataclass(slots=True, eq=False)
class AckGroup:
    """The slots released by one flush, until the broker acknowledged all their outputs."""

    lanes: dict[Lane, tuple[int, int]]  # lane -> (slots released, last offset released)
    slots: list[Slot]
    sent_mono: float
    after: list[tuple[str, OutRecord]] = field(default_factory=list)  # sent once phase 1 is acknowledged
    phase: int = 1
    after_ready: bool = False
    after_sent: bool = False
    pending: int = 0
    failures: list[tuple[str, list[OutRecord], list[Slot | None], BaseException]] = field(default_factory=list)
    done: bool = False


class Emitter:
    """Build outputs, release them per lane in delivery order, and track acknowledgements.

    Args:
        sink: Where records go.
        config: Topics, labels and limits.
        metrics: Output counters and histograms.
        on_acked: Called with the number of slots acknowledged (the pipeline frees that much space).
        on_fatal: Called once when the broker side is broken (the worker stops without committing).
        clock: Monotonic seconds; ``wall_clock``: Unix seconds (injected in tests).
    """

    def __init__(
        self,
        *,
        sink: Sink,
        config: EmitterConfig,
        metrics: Metrics,
        on_acked: Callable[[int], None],
        on_fatal: Callable[[BaseException], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.config = config
        self.metrics = metrics
        self.on_acked = on_acked
        self.on_fatal = on_fatal
        self.clock = clock
        self.wall_clock = wall_clock
        self.lanes: dict[int, Lane] = {}
        self.stages: list[ReleaseStage] = []
        #: exactly-once output when set: each lane's released slots in a transaction of their own
        self.transactions: TransactionalSink | None = None
        self._busy: set[Lane] = set()
        self._transaction_done = asyncio.Event()
        self._groups: list[AckGroup] = []
        self._flush_wanted = asyncio.Event()
        self._afters_wanted = asyncio.Event()
        self._metrics_outbox: list[OutRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._event_headers: dict[str, EventHeaders] = {}
        self._events_total = metrics.events_total
        self._produce_seconds = metrics.stage_seconds.labels("produce")
        self._postprocess_seconds = metrics.stage_seconds.labels("postprocess")
        self.last_ack = clock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="emitter-flush")
        self._task.add_done_callback(self._on_task_done)
        after = asyncio.create_task(self._after_loop(), name="emitter-after")
        self._tasks.add(after)
        after.add_done_callback(self._on_task_done)

    async def stop(self) -> None:
        self._closing = True
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 -- stopping: the failure was reported when it happened
                _log.debug("emitter task ended with %r while stopping", exc)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is not None:
            self.on_fatal(exc)

    # ------------------------------------------------------------------ lanes
    def lane(self, partition: int) -> Lane:
        """The live lane of ``partition`` (created on first use after an assignment)."""
        lane = self.lanes.get(partition)
        if lane is None:
            lane = self.lanes[partition] = Lane(partition)
        return lane

    def drop(self, partitions: Sequence[int]) -> int:
        """Forget revoked partitions; returns how many of their slots were never released (now abandoned)."""
        abandoned = 0
        for p in partitions:
            lane = self.lanes.pop(p, None)
            if lane is None:
                continue
            lane.dead = True
            abandoned += len(lane.window) - lane.released
        return abandoned

    async def wait_transactions(self, partitions: Sequence[int], timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until no transaction of these partitions is in flight (one may carry
        only stage records, with every slot already acknowledged); False when one still is."""
        lanes = {self.lanes[p] for p in partitions if p in self.lanes}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while lanes & self._busy:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._transaction_done.clear()
            try:
                await asyncio.wait_for(self._transaction_done.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def pending_groups(self, partitions: Sequence[int]) -> bool:
        """Whether outputs of these partitions still wait for the broker."""
        wanted = {self.lanes[p] for p in partitions if p in self.lanes}
        return any(not g.done and wanted.intersection(g.lanes) for g in self._groups)

    # ------------------------------------------------------------------ outputs
    def complete(self, slots: Sequence[Slot]) -> None:
        """Build the output of each decided slot (result or dead verdict) and schedule a flush."""
        if not slots:
            return
        t0 = self.clock()
        now_wall = self.wall_clock()
        emitted_at = rfc3339(now_wall)
        for s in slots:
            if s.lane.dead:
                continue
            try:
                if s.dead is None:
                    s.out = self._event(s, emitted_at, t0)
                    s.out_topic = self.config.events_topic
                else:
                    s.out = self._dead_letter(s, now_wall)
                    s.out_topic = self.config.dead_letters_topic
            # Broad on purpose: whatever building this record's output raises is this record's problem.
            except Exception as exc:  # noqa: BLE001
                s.dead = DeadInfo("output_failed", "output", exc)
                s.out = self._dead_letter(s, now_wall)
                s.out_topic = self.config.dead_letters_topic
            s.done = True
        self._postprocess_seconds.observe(self.clock() - t0)
        self._flush_wanted.set()

    def _event(self, s: Slot, emitted_at: str, now_mono: float) -> OutRecord:
        m = s.message
        r = s.result
        assert m is not None and r is not None
        cfg = self.config
        labels = cfg.labels
        scores = r.scores
        li = r.label_index
        chunk = s.chunk
        b = s.batch
        topic, partition, offset = chunk.topic, s.lane.partition, s.offset
        if isinstance(b, BatchStats):
            queue_wait, infer, post = b.queue_wait_s * 1e3, b.infer_s * 1e3, b.postprocess_s * 1e3
        else:
            queue_wait = infer = post = 0.0
        event_id = hashlib.blake2b(f"{topic}\x00{partition}\x00{offset}".encode(), digest_size=16).hexdigest()
        doc = {
            "schema": "emotion_event.v1",
            "event_id": event_id,
            "message_id": m.message_id,
            "conversation_id": m.conversation_id,
            "user_id": m.user_id,
            "label": labels[li],
            "score": scores[li],
            "scores": dict(zip(labels, scores, strict=True)),
            "model": cfg.model,
            "cache": _CACHE_DOCS[s.level],
            "truncated": r.truncated,
            "timings_ms": {
                "decode": chunk.decode_s * 1e3,
                "cache": chunk.cache_s * 1e3,
                "queue_wait": queue_wait,
                "tokenize": chunk.tokenize_s * 1e3 if s.level == "none" or s.level == "batch" else 0.0,
                "infer": infer,
                "postprocess": post,
                "total": max(0.0, now_mono - chunk.received_mono) * 1e3,
            },
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "sent_at": render_sent_at(m.sent_at),
            "received_at": chunk.received_at,
            "emitted_at": emitted_at,
            "traceparent": m.traceparent,
        }
        value = orjson.dumps(doc)
        key = m.conversation_id.encode()
        builder = self._event_headers.get(topic)
        if builder is None:
            builder = self._event_headers[topic] = EventHeaders(event_source(topic))
        headers = builder.build(event_id, emitted_at, s.trace)
        if len(value) + len(key) + _RECORD_OVERHEAD + 1024 > cfg.max_record_bytes:
            raise OutputRejectedError(f"event of {len(value)} bytes is over max_record_bytes={cfg.max_record_bytes}")
        return OutRecord(key, value, headers)

    def _dead_letter(self, s: Slot, now_wall: float, *, reduced: bool = False) -> OutRecord:
        """The dead letter of ``s``, bounded by construction under ``max_record_bytes`` with its key and
        headers (see :meth:`DeadLetter.build`); ``reduced`` leaves the raw bytes out. If building it raises
        (it should not), a minimal dead letter built here is the floor."""
        info = s.dead
        assert info is not None
        trace = s.trace if s.trace is not None else _trace_of(s)
        try:
            dead = DeadLetter.build(
                reason=info.reason,  # type: ignore[arg-type]
                stage=info.stage,  # type: ignore[arg-type]
                error=info.error,
                source=SourceRef.model_construct(topic=s.chunk.topic, partition=s.lane.partition, offset=s.offset),
                raw_key=s.key,
                raw_value=s.value,
                received_at=s.chunk.received_wall,
                worker_id=self.config.worker_id,
                max_record_bytes=self.config.max_record_bytes,
                max_raw_bytes=self.config.max_raw_bytes,
            )
            if reduced:
                dead = dead.reduced()
            value = dead.to_json()
            record = OutRecord(dead.kafka_key, value, dead_letter_headers(dead, trace))
            size = len(value) + len(record.key or b"") + headers_size(record.headers) + _RECORD_OVERHEAD
            if size > self.config.max_record_bytes:
                raise OutputRejectedError(f"dead letter of {size} bytes is over {self.config.max_record_bytes}")
        except Exception as exc:  # noqa: BLE001 -- the minimal form below is the floor that cannot fail
            _log.warning("dead letter of %s[%d]@%d failed to build (%r); sending a minimal one", s.chunk.topic,
                         s.lane.partition, s.offset, exc)  # fmt: skip
            record = self._minimal_dead_letter(s, info, now_wall)
        self.metrics.dead_letters_total.labels(info.reason).inc()
        return record

    def _minimal_dead_letter(self, s: Slot, info: DeadInfo, now_wall: float) -> OutRecord:
        raw_size = len(s.value) if s.value is not None else 0
        doc = {
            "schema": "dead_letter.v1",
            "reason": info.reason,
            "stage": info.stage,
            "error_class": type(info.error).__name__[:200],
            "error_message": _safe_text(info.error)[:1000],
            "source": {"topic": s.chunk.topic, "partition": s.lane.partition, "offset": s.offset},
            "raw_key_b64": None,
            "raw_value_b64": None,
            "raw_size_bytes": raw_size,
            "raw_truncated": raw_size > 0,
            "received_at": rfc3339(now_wall),
            "worker_id": self.config.worker_id[:256],
            "raw_omitted": True,
        }
        return OutRecord(None, orjson.dumps(doc), [])

    # ------------------------------------------------------------------ flushing
    def request_flush(self) -> None:
        self._flush_wanted.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            await self.flush()

    async def flush(self) -> None:
        """Release every lane's done slots (front of its window) and send them as one ack group.

        Stages (:class:`ReleaseStage`) see the released slots in delivery order and add outputs of their
        own: ``now`` ones go with the slots' outputs, ``after`` ones once all of those are acknowledged
        (the group completes, and its offsets become committable, only when both phases are).
        """
        if self.transactions is not None:
            self._flush_transactional(self.transactions)
            return
        released: list[Slot] = []
        lanes: dict[Lane, tuple[int, int]] = {}
        for lane in self.lanes.values():
            window = lane.window
            start = i = lane.released
            n = len(window)
            while i < n and window[i].done:
                i += 1
            if i > start:
                chunk = list(islice(window, start, i))
                released.extend(chunk)
                lanes[lane] = (i - start, chunk[-1].offset)
                lane.released = i
        outbox, self._metrics_outbox = self._metrics_outbox, []
        if outbox:
            await self._send_metrics(outbox)
        extra_now: list[tuple[str, OutRecord]] = []
        extra_after: list[tuple[str, OutRecord]] = []
        for stage in self.stages:
            try:
                out = stage.on_release(released)
            except Exception as exc:  # noqa: BLE001 -- a stage's bug must not stop the events it follows
                self.metrics.errors_total.labels(stage.name).inc()
                _log.exception("stage %s failed on %d released message(s): %r", stage.name, len(released), exc)
                continue
            extra_now.extend(out.now)
            extra_after.extend(out.after)
        if not released and not extra_now and not extra_after:
            return
        group = AckGroup(lanes=lanes, slots=released, sent_mono=self.clock(), after=extra_after)
        self._groups.append(group)
        by_topic: dict[str, tuple[list[OutRecord], list[Slot | None]]] = {}
        for s in released:
            entry = by_topic.get(s.out_topic)
            if entry is None:
                entry = by_topic[s.out_topic] = ([], [])
            assert s.out is not None
            entry[0].append(s.out)
            entry[1].append(s)
        for topic, record in extra_now:
            entry = by_topic.get(topic)
            if entry is None:
                entry = by_topic[topic] = ([], [])
            entry[0].append(record)
            entry[1].append(None)
        await self._send_phase(group, by_topic)

    async def _send_phase(
        self, group: AckGroup, by_topic: dict[str, tuple[list[OutRecord], list[Slot | None]]]
    ) -> None:
        for topic, (records, slots) in by_topic.items():
            deliveries = await self.sink.send(topic, records)
            for indexes, fut in deliveries:
                group.pending += 1
                part_records = [records[i] for i in indexes]
                part_slots = [slots[i] for i in indexes]
                fut.add_done_callback(functools.partial(self._on_delivery, group, topic, part_records, part_slots))
        if group.pending == 0:
            self._phase_done(group)

    def _on_delivery(
        self,
        group: AckGroup,
        topic: str,
        records: list[OutRecord],
        slots: list[Slot | None],
        fut: asyncio.Future[int | None],
    ) -> None:
        if fut.cancelled():
            group.failures.append((topic, records, slots, InfrastructureError("produce cancelled")))
        elif (exc := fut.exception()) is not None:
            group.failures.append((topic, records, slots, exc))
        elif group.phase == 2:
            base = fut.result()
            partition = records[0].partition
            if base is not None and partition is not None:
                for stage in self.stages:
                    stage.on_after_acked(topic, partition, records, base + len(records) - 1)
        group.pending -= 1
        if group.pending:
            return
        if group.failures:
            task = asyncio.get_running_loop().create_task(self._recover(group), name="emitter-recover")
            self._tasks.add(task)
            task.add_done_callback(self._on_task_done)
        else:
            self._phase_done(group)

    def _phase_done(self, group: AckGroup) -> None:
        if group.phase == 1 and group.after:
            group.phase = 2
            group.after_ready = True
            self._afters_wanted.set()  # the after-sender sends it once every earlier group's are sent
            return
        self._group_done(group)

    async def _after_loop(self) -> None:
        """Send the second phases in group order: a later group's state write never overtakes an earlier
        one's for the same key, whichever group's first phase the broker acknowledged first."""
        while True:
            await self._afters_wanted.wait()
            self._afters_wanted.clear()
            for group in list(self._groups):
                if not group.after:
                    continue
                if group.after_sent:
                    continue
                if not group.after_ready:
                    break
                group.after_sent = True
                by_topic: dict[str, tuple[list[OutRecord], list[Slot | None]]] = {}
                for topic, record in group.after:
                    entry = by_topic.get(topic)
                    if entry is None:
                        entry = by_topic[topic] = ([], [])
                    entry[0].append(record)
                    entry[1].append(None)
                await self._send_phase(group, by_topic)

    async def _recover(self, group: AckGroup) -> None:
        """Re-send a refused batch record by record; a record still refused becomes a reduced dead letter."""
        failures, group.failures = group.failures, []
        for topic, records, slots, exc in failures:
            if not isinstance(exc, OutputRejectedError) or group.phase == 2:
                raise InfrastructureError(f"producing to {topic} failed: {exc!r}") from exc
            _log.warning("the broker refused a batch of %d record(s) for %s (%r); sending them one by one",
                         len(records), topic, exc)  # fmt: skip
            for record, slot in zip(records, slots, strict=True):
                try:
                    await self._send_one(topic, record)
                except OutputRejectedError as alone:
                    if topic == self.config.dead_letters_topic:
                        raise InfrastructureError(f"the broker refused a dead letter: {alone!r}") from alone
                    if slot is None:  # a stage's own output (a state or alert record): counted, not retried
                        self.metrics.errors_total.labels("produce").inc()
                        _log.error("the broker refused a %s record: %r", topic, alone)
                        continue
                    slot.dead = DeadInfo("output_failed", "output", alone)
                    reduced = self._dead_letter(slot, self.wall_clock(), reduced=True)
                    try:
                        await self._send_one(self.config.dead_letters_topic, reduced)
                    except OutputRejectedError as dlq_exc:
                        raise InfrastructureError(f"the broker refused a dead letter: {dlq_exc!r}") from dlq_exc
        self._phase_done(group)

    async def _send_one(self, topic: str, record: OutRecord) -> None:
        for _, fut in await self.sink.send(topic, [record]):
            await fut

    # ------------------------------------------------------------------ exactly-once
    def _flush_transactional(self, txn: TransactionalSink) -> None:
        """Start a transaction for every idle lane with released slots or stage records (one at a time per
        lane; lanes in parallel). Stage metrics ride in the first of them."""
        outbox, self._metrics_outbox = self._metrics_outbox, []
        for lane in list(self.lanes.values()):
            if lane in self._busy or lane.dead:
                continue
            window = lane.window
            start = i = lane.released
            n = len(window)
            while i < n and window[i].done:
                i += 1
            slots = list(islice(window, start, i))
            lane.released = i
            extra: list[tuple[str, OutRecord]] = []
            for stage in self.stages:
                try:
                    out = stage.on_release(slots, lane.partition)
                except Exception as exc:  # noqa: BLE001 -- a stage's bug must not stop the events it follows
                    self.metrics.errors_total.labels(stage.name).inc()
                    _log.exception("stage %s failed on partition %d: %r", stage.name, lane.partition, exc)
                    continue
                extra.extend(out.now)
                extra.extend(out.after)
            if outbox:
                extra.extend((self.config.metrics_topic, r) for r in outbox)
                outbox = []
            if not slots and not extra:
                continue
            self._busy.add(lane)
            task = asyncio.get_running_loop().create_task(
                self._transact(txn, lane, slots, extra), name=f"emitter-txn-{lane.partition}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._on_task_done)
        self._metrics_outbox = outbox + self._metrics_outbox

    async def _transact(
        self, txn: TransactionalSink, lane: Lane, slots: list[Slot], extra: list[tuple[str, OutRecord]]
    ) -> None:
        partition = lane.partition
        sent = self.clock()
        try:
            records: list[tuple[str, OutRecord, Slot | None]] = [(s.out_topic, s.out, s) for s in slots if s.out]
            records += [(topic, record, None) for topic, record in extra]
            try:
                acked = await self._send_in_transaction(txn, partition, records)
            except OutputRejectedError as exc:
                _log.warning("the broker refused a record in partition %d's transaction (%r); retrying its "
                             "records one transaction each", partition, exc)  # fmt: skip
                await txn.abort(partition)
                acked = await self._isolate_in_transactions(txn, partition, records)
                last = slots[-1].offset + 1 if slots else None
                await txn.begin(partition)
                await txn.commit(partition, last)
            else:
                await txn.commit(partition, slots[-1].offset + 1 if slots else None)
        except Exception as exc:
            if lane.dead or lane.revoking:
                # The partition is leaving (or has left): nothing of this transaction is committed, and the
                # next owner reads its records again from the committed offset. A worker that was paused
                # past its session fails here once the new owner has fenced its producer; stopping it for
                # that would only restart it into the same group.
                lane.dead = True
                self.on_acked(len(slots))  # their space: they are abandoned, never acknowledged
                _log.warning("partition %d's transaction failed while the partition was being revoked (%r): "
                             "aborted; its next owner processes its input again", partition, exc)  # fmt: skip
                return
            raise InfrastructureError(f"transaction of partition {partition} failed: {exc!r}") from exc
        finally:
            self._busy.discard(lane)
            self._transaction_done.set()
            self._flush_wanted.set()
        for topic, out_partition, batch, last_offset in acked:
            for stage in self.stages:
                stage.on_after_acked(topic, out_partition, batch, last_offset)
        if slots:
            group = AckGroup(lanes={lane: (len(slots), slots[-1].offset)}, slots=slots, sent_mono=sent)
            self._apply(group)
            if not lane.dead:
                lane.committed_offset = lane.acked_offset  # the transaction committed the offset

    async def _send_in_transaction(
        self, txn: TransactionalSink, partition: int, records: list[tuple[str, OutRecord, Slot | None]]
    ) -> list[tuple[str, int, list[OutRecord], int]]:
        """Send ``records`` in a new transaction of ``partition``; returns the acknowledged explicit-partition
        batches (topic, partition, records, last offset) for the stages. Raises OutputRejectedError first."""
        await txn.begin(partition)
        by_topic: dict[str, list[OutRecord]] = {}
        for topic, record, _ in records:
            by_topic.setdefault(topic, []).append(record)
        waits: list[tuple[str, list[OutRecord], asyncio.Future[int | None]]] = []
        for topic, recs in by_topic.items():
            for indexes, fut in await txn.send(partition, topic, recs):
                waits.append((topic, [recs[i] for i in indexes], fut))
        results = await asyncio.gather(*(fut for _, _, fut in waits), return_exceptions=True)
        acked: list[tuple[str, int, list[OutRecord], int]] = []
        for (topic, recs, _), result in zip(waits, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if result is not None and recs[0].partition is not None:
                acked.append((topic, recs[0].partition, recs, result + len(recs) - 1))
        return acked

    async def _isolate_in_transactions(
        self, txn: TransactionalSink, partition: int, records: list[tuple[str, OutRecord, Slot | None]]
    ) -> list[tuple[str, int, list[OutRecord], int]]:
        """One transaction per record; a record the broker refuses becomes a reduced dead letter."""
        acked: list[tuple[str, int, list[OutRecord], int]] = []
        for topic, record, slot in records:
            try:
                acked += await self._send_in_transaction(txn, partition, [(topic, record, slot)])
                await txn.commit(partition, None)
            except OutputRejectedError as alone:
                await txn.abort(partition)
                if slot is None or topic == self.config.dead_letters_topic:
                    self.metrics.errors_total.labels("produce").inc()
                    _log.error("the broker refused a %s record: %r", topic, alone)
                    continue
                slot.dead = DeadInfo("output_failed", "output", alone)
                reduced = self._dead_letter(slot, self.wall_clock(), reduced=True)
                await self._send_in_transaction(txn, partition, [(self.config.dead_letters_topic, reduced, slot)])
                await txn.commit(partition, None)
        return acked

    def _group_done(self, group: AckGroup) -> None:
        group.done = True
        groups = self._groups
        n_done = 0
        while n_done < len(groups) and groups[n_done].done:
            self._apply(groups[n_done])
            n_done += 1
        if n_done:
            del groups[:n_done]

    def _apply(self, group: AckGroup) -> None:
        now = self.clock()
        self.last_ack = now
        for lane, (count, last_offset) in group.lanes.items():
            if lane.dead:
                continue
            window = lane.window
            for _ in range(count):
                window.popleft()
            lane.released -= count
            lane.acked_offset = last_offset + 1
            if not window:
                lane.caught_up_since = now
        events = 0
        oldest = now
        finished: list[BatchStats] = []
        for s in group.slots:
            if s.dead is None:
                events += 1
            if s.chunk.received_mono < oldest:
                oldest = s.chunk.received_mono
            b = s.batch
            if isinstance(b, BatchStats):
                b.outstanding -= 1
                if b.outstanding == 0:
                    finished.append(b)
        if events:
            self._events_total.inc(events)
        produce_s = now - group.sent_mono
        self._produce_seconds.observe(produce_s)
        self.metrics.end_to_end_seconds.observe(now - oldest)
        for b in finished:
            self._metrics_outbox.append(self._stage_metrics(b, produce_s))
        if finished:
            self._flush_wanted.set()
        self.on_acked(len(group.slots))

    def _stage_metrics(self, b: BatchStats, produce_s: float) -> OutRecord:
        cfg = self.config
        record = StageMetrics(
            batch_id=b.batch_id,
            worker_id=cfg.worker_id,
            engine=cfg.engine,
            device=cfg.model.get("device", "cpu"),
            size=b.size,
            real_tokens=b.real_tokens,
            padded_tokens=b.padded_tokens,
            token_budget=max(1, b.token_budget),
            closed_reason=b.closed_reason,
            stage_ms=StageMs(
                queue_wait=b.queue_wait_s * 1e3,
                tokenize=b.tokenize_s * 1e3,
                infer=b.infer_s * 1e3,
                postprocess=b.postprocess_s * 1e3,
                produce=produce_s * 1e3,
            ),
            cache=CacheCounts(l1_hits=b.l1_hits, l2_hits=b.l2_hits, batch_hits=b.batch_hits, misses=b.size),
            emitted_at=rfc3339(self.wall_clock()),
        )
        return OutRecord(cfg.worker_id.encode(), record.to_json(), [])

    async def _send_metrics(self, records: list[OutRecord]) -> None:
        """Stage metrics are best effort: they never hold back an offset, a failure is only counted."""
        for _, fut in await self.sink.send(self.config.metrics_topic, records):
            fut.add_done_callback(self._on_metrics_sent)

    def _on_metrics_sent(self, fut: asyncio.Future[int | None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.metrics.errors_total.labels("produce").inc()
            _log.warning("stage metrics not produced: %r", fut.exception())


def _trace_of(s: Slot) -> TraceContext | None:
    """The trace context of a record that never got through intake (its headers only)."""
    try:
        return read_trace_context(s.headers, None) if s.headers else None
    except Exception:  # noqa: BLE001 -- headers a dead letter cannot read are simply not propagated
        return None


def _safe_text(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 -- an exception whose str() raises still gets a dead letter
        return "<unprintable error>"
    return text.encode("utf-8", "replace").decode("utf-8")
