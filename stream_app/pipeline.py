"""The processing pipeline between the consumer and the producer, with no broker in sight.

```
submit(item) ──► intake (bounded) ──► tokenise (thread) ──► batcher (bounded; count/tokens/age)
     │                                                              │
     │ cache hit / dead letter                                      ▼
     └──────────────► ordered emitter ◄─── post-process ◄─── infer (thread; split on failure)
                      (per-partition source order) ──► sink.send_* ──► broker ack ──► sink.ack
```

Batches are inferred while the next one forms (``concurrent_batches`` at once, each in an inference
thread; they may finish out of order, which the emitter absorbs). Each stage is bounded, so a slow engine slows
``submit`` (and so the consumer) instead of growing memory. The sink (the Faust wiring in ``app.py``)
sends records and acknowledges source offsets; this module only decides what to send and when.
Events leave in source order per partition, so per-conversation order (key = conversation_id) holds
even though batches are grouped by length and cache hits finish early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_app.batching import AdaptiveBudget, AsyncBatcher, Batch, Batcher, BatcherClosed
from stream_app.cache.admission import Admission
from stream_app.cache.codec import CachedResult
from stream_app.cache.keys import ModelIdentity, normalise
from stream_app.cache.keys import cache_key as cache_key_for
from stream_app.cache.lru import TtlLru
from stream_app.errors import (
    ConfigError,
    DecodeError,
    DeviceOutOfMemoryError,
    EmotionStreamError,
    InfrastructureError,
    InputError,
    TextTooLongError,
)
from stream_app.inference.base import Engine, memory_token_budget, predict_split
from stream_app.inference.tokenize import Encoded, TextEncoder
from stream_app.metrics import Metrics
from stream_app.records import (
    CacheCounts,
    CacheInfo,
    ChatMessage,
    DeadLetter,
    EmotionEvent,
    EventTimings,
    ModelInfo,
    SourceRef,
    StageMetrics,
    StageMs,
    decode_chat_message,
    event_id_for,
    rfc3339,
)

__all__ = ["Item", "L1Entry", "Pipeline", "PipelineConfig", "Sink"]

_log = logging.getLogger(__name__)
CacheLevel = str  # "l1" | "l2" | "batch" | "none"


@dataclass(eq=False, slots=True)
class Item:
    """One source message on its way through the pipeline."""

    token: object  # the sink's handle to acknowledge this message (a Faust event)
    source: SourceRef
    raw_key: bytes | None
    raw_value: bytes | None
    received_wall: float
    received_mono: float
    message: ChatMessage | None = None
    cache_key: bytes | None = None
    result: CachedResult | None = None
    cache_level: CacheLevel = "none"
    dead: DeadLetter | None = None
    store_l2: bool = False
    encoded: Encoded | None = None
    text: str = ""
    stage_s: dict[str, float] = field(default_factory=dict)
    enqueued_mono: float = 0.0
    batch: _BatchStats | None = None
    done: bool = False


@dataclass(eq=False, slots=True)
class L1Entry:
    """An L1 value: the result, and the partitions whose L2 already holds it."""

    result: CachedResult
    l2_partitions: set[int] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class _BatchStats:
    """Book-keeping of one inference batch until all of its events are acknowledged."""

    batch_id: int
    size: int
    real_tokens: int
    padded_tokens: int
    token_budget: int
    closed_reason: str
    queue_wait_s: float
    tokenize_s: float
    infer_s: float
    postprocess_s: float
    cache: CacheCounts
    outstanding: int


_CACHE_INFO: dict[str, CacheInfo] = {
    level: CacheInfo(hit=level != "none", level=level) for level in ("l1", "l2", "batch", "none")
}


class Sink(Protocol):
    """What the pipeline needs from the broker side (implemented with Faust in ``app.py``)."""

    async def send_event(self, item: Item, event: EmotionEvent) -> Awaitable[object]:
        """Hand the event to the producer; the returned awaitable resolves on the broker's ack."""
        ...

    async def send_dead_letter(self, item: Item, dead: DeadLetter) -> Awaitable[object]:
        """Hand the dead letter to the producer; the returned awaitable resolves on the broker's ack."""
        ...

    async def send_metrics(self, record: StageMetrics) -> None:
        """Send one stage_metrics record (best effort: it never holds back a source offset)."""
        ...

    async def ack(self, item: Item) -> None:
        """The item's outputs are durable: its source offset may be committed."""
        ...

    def cache_store(self, item: Item, key: bytes, value: CachedResult) -> None:
        """Write a fresh result to the L2 cache, in the item's partition."""
        ...


@dataclass(frozen=True)
class PipelineConfig:
    """Plain values the pipeline needs (built from :class:`~stream_app.settings.Settings`)."""

    worker_id: str
    max_batch_size: int
    max_batch_tokens: int
    max_wait_s: float
    queue_capacity: int
    group_by_length: bool
    adaptive: bool
    target_batch_s: float
    min_batch_tokens: int
    max_batch_tokens_ceiling: int
    overlong_reject: bool
    max_message_bytes: int
    max_text_chars: int
    l2_ttl_s: float
    l2_enabled: bool
    tokenize_chunk: int = 256
    max_consecutive_failures: int = 8
    concurrent_batches: int = 1
    overlap_full_batches_only: bool = True


class Pipeline:
    """Batch, infer and emit the messages handed to :meth:`submit`."""

    def __init__(
        self,
        *,
        engine: Engine,
        encoder: TextEncoder,
        sink: Sink,
        config: PipelineConfig,
        metrics: Metrics,
        l1: TtlLru[bytes, L1Entry] | None,
        admission: Admission | None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.encoder = encoder
        self.sink = sink
        self.config = config
        self.metrics = metrics
        self.l1 = l1
        self.admission = admission
        self.clock = clock
        self.wall_clock = wall_clock
        self.labels = engine.labels
        info = engine.info
        self.model_info = ModelInfo(
            name=info.model_name,
            version=info.model_version,
            runtime=info.runtime,
            precision=info.precision,
            device=info.device,
        )
        self.engine_label = f"{info.kind}-{info.precision}"
        self.identity = ModelIdentity(
            name=info.model_name, version=info.model_version, runtime=info.kind, precision=info.precision
        )
        self._intake: asyncio.Queue[Item] = asyncio.Queue(maxsize=config.queue_capacity)
        self._batcher = Batcher[Item](
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_s,
            capacity=config.queue_capacity,
            group_by_length=config.group_by_length,
            clock=clock,
        )
        self.batcher = AsyncBatcher(self._batcher)
        self.budget = AdaptiveBudget(
            initial=config.max_batch_tokens,
            minimum=config.min_batch_tokens,
            maximum=config.max_batch_tokens_ceiling,
            target_s=config.target_batch_s,
        )
        # The tokenizer and the engine overlap in threads of their own; torch/ORT add their intra-op pools.
        # concurrent_batches > 1 runs that many batches at once on the one (thread-safe) engine.
        if config.concurrent_batches < 1:
            raise ConfigError(f"concurrent_batches must be >= 1, got {config.concurrent_batches}")
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._infer_pool = ThreadPoolExecutor(config.concurrent_batches, thread_name_prefix="infer")
        # in-flight bound: what may wait in intake + batcher + the batches running + the ordered emitter
        self._slots = asyncio.Semaphore(
            2 * config.queue_capacity + (1 + config.concurrent_batches) * config.max_batch_size
        )
        self._order: dict[tuple[str, int], deque[Item]] = {}
        self._emit_wakeup = asyncio.Event()
        self._get_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._batch_seq = 0
        self._running = 0
        self._hits_since_batch = {"l1": 0, "l2": 0, "batch": 0}
        self._consecutive_failures = 0
        self._in_flight = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._tokenize_loop(), name="pipeline-tokenize"),
            asyncio.create_task(self._emit_loop(), name="pipeline-emit"),
        ]
        self._tasks += [
            asyncio.create_task(self._infer_loop(), name=f"pipeline-infer-{i}")
            for i in range(self.config.concurrent_batches)
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is not None and self.failed is None:
            _log.error("pipeline task %s failed: %r", task.get_name(), exc)
            self.failed = exc

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until everything submitted so far is acknowledged (used at shutdown and in tests)."""
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def stop(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *self._ack_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tokenize_pool.shutdown(wait=True, cancel_futures=True)
        self._infer_pool.shutdown(wait=True, cancel_futures=True)

    def warm(self, phrases: Sequence[str]) -> int:
        """Infer common phrases into L1 before traffic (synchronous; call before :meth:`start`)."""
        if self.l1 is None or not phrases:
            return 0
        texts = list(dict.fromkeys(normalise(p) for p in phrases if p.strip()))
        step = self.config.max_batch_size
        now = self.wall_clock()
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            encoded = self.encoder.encode(chunk)
            probs = self._predict(encoded)
            for text, enc, row in zip(chunk, encoded, probs, strict=True):
                item = Item(
                    token=None,
                    source=SourceRef(topic="", partition=0, offset=0),
                    raw_key=None,
                    raw_value=None,
                    received_wall=now,
                    received_mono=0.0,
                    encoded=enc,
                )
                self.l1.put(cache_key_for(text, self.identity), L1Entry(self._result_from(row, item, now)))
        return len(texts)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ------------------------------------------------------------------ intake
    def make_item(self, token: object, source: SourceRef, raw_key: bytes | None, raw_value: bytes | None) -> Item:
        """Decode, validate and look up one raw message (on the event loop; cheap).

        The returned item is decided (a dead letter or an L1 hit) or needs inference; the caller may
        still try its own cache level (L2) before :meth:`submit`.
        """
        t0 = self.clock()
        item = Item(
            token=token,
            source=source,
            raw_key=raw_key,
            raw_value=raw_value,
            received_wall=self.wall_clock(),
            received_mono=t0,
        )
        if raw_value is not None and len(raw_value) > self.config.max_message_bytes:
            self._mark_dead(item, "too_large", "decode", DecodeError(f"{len(raw_value)} bytes is over the limit"))
            return item
        try:
            message = decode_chat_message(raw_value)
        except InputError as exc:
            stage = "decode" if isinstance(exc, DecodeError) else "validate"
            self._mark_dead(item, exc.reason, stage, exc)
            return item
        text = normalise(message.text)
        if len(text) > self.config.max_text_chars:
            if self.config.overlong_reject:
                error = TextTooLongError(f"{len(text)} characters is over max_text_chars")
                self._mark_dead(item, "text_too_long", "validate", error)
                return item
            text = text[: self.config.max_text_chars]
        item.message = message
        item.text = text
        t1 = self.clock()
        item.stage_s["decode"] = t1 - t0
        item.cache_key = cache_key_for(text, self.identity)
        admitted = self.admission.admit(item.cache_key) if self.admission is not None else True
        entry = self.lookup_l1(item.cache_key)
        if entry is not None:
            item.result, item.cache_level = entry.result, "l1"
            # promote a popular text into this partition's L2 once (L1 is shared by all partitions)
            item.store_l2 = admitted and source.partition not in entry.l2_partitions
        else:
            item.store_l2 = admitted
        item.stage_s["cache"] = self.clock() - t1
        return item

    def lookup_l1(self, key: bytes) -> L1Entry | None:
        """The L1 entry for ``key``, or None (counts the lookup)."""
        if self.l1 is None:
            return None
        hit = self.l1.get(key)
        self.metrics.cache_lookups_total.labels("l1", "hit" if hit is not None else "miss").inc()
        return hit

    async def submit(self, item: Item) -> None:
        """Take one message: a decided item (cache hit, dead letter) or one to infer.

        Waits while the pipeline is full; that is the backpressure on the consumer.
        """
        if self.failed is not None:
            raise InfrastructureError(f"pipeline stopped: {self.failed!r}") from self.failed
        await self._slots.acquire()
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self._in_flight)
        self.metrics.messages_total.inc()
        self._order.setdefault((item.source.topic, item.source.partition), deque()).append(item)
        if item.dead is not None or item.result is not None:
            if item.result is not None:
                self._hits_since_batch[item.cache_level] += 1
            self._complete(item)
            return
        await self._intake.put(item)
        self.metrics.queue_depth.set(self._intake.qsize() + len(self.batcher))

    def _complete(self, item: Item) -> None:
        item.done = True
        self._emit_wakeup.set()

    # ------------------------------------------------------------------ tokenise
    async def _tokenize_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chunk = [await self._intake.get()]
            while len(chunk) < self.config.tokenize_chunk and not self._intake.empty():
                chunk.append(self._intake.get_nowait())
            texts = [it.text for it in chunk]
            t0 = self.clock()
            encoded = await loop.run_in_executor(self._tokenize_pool, self.encoder.encode, texts)
            spent = self.clock() - t0
            self.metrics.stage_seconds.labels("tokenize").observe(spent)
            for it, enc in zip(chunk, encoded, strict=True):
                it.encoded = enc
                it.stage_s["tokenize"] = spent
                if enc.truncated and self.config.overlong_reject:
                    self._dead_letter(
                        it,
                        "text_too_long",
                        "tokenize",
                        TextTooLongError(f"text is over the {enc.n_tokens}-token limit"),
                    )
                    continue
                it.enqueued_mono = self.clock()
                await self.batcher.put(it, enc.n_tokens)

    # ------------------------------------------------------------------ infer
    async def _infer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # the batcher has one consumer: concurrent infer loops take turns waiting for a batch
                async with self._get_lock:
                    batch = await self.batcher.get(full_only=self._only_full_batches)
            except BatcherClosed:
                return
            self.metrics.queue_depth.set(self._intake.qsize() + len(self.batcher))
            self._running += 1
            try:
                await self._run_batch(loop, batch)
            finally:
                self._running -= 1
                self.batcher.poke()  # a waiting loop may now take a batch closed by age

    def _only_full_batches(self) -> bool:
        """While a batch runs, another starts only when full (see ``overlap_full_batches_only``)."""
        return self.config.overlap_full_batches_only and self._running > 0

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: Batch[Item]) -> None:
        items = list(batch.items)
        closed = batch.closed_at
        for it in items:
            it.stage_s["queue_wait"] = max(0.0, closed - it.enqueued_mono)
            self.metrics.queue_wait_seconds.observe(it.stage_s["queue_wait"])
        # identical texts in one batch are inferred once
        unique: dict[bytes, list[Item]] = {}
        for it in items:
            unique.setdefault(it.cache_key or id(it).to_bytes(8, "little"), []).append(it)
        leaders = [group[0] for group in unique.values()]
        encoded = [it.encoded for it in leaders if it.encoded is not None]
        t0 = self.clock()
        try:
            probs = await loop.run_in_executor(self._infer_pool, self._predict, encoded)
        except EmotionStreamError as exc:
            await self._isolate_failures(loop, leaders, unique, exc)
            return
        infer_s = self.clock() - t0
        self._consecutive_failures = 0
        self._observe_batch(batch, infer_s)
        t1 = self.clock()
        stats = _BatchStats(
            batch_id=self._batch_seq,
            size=len(leaders),
            real_tokens=sum(e.n_tokens for e in encoded),
            padded_tokens=max((e.n_tokens for e in encoded), default=0) * len(encoded),
            token_budget=self._batcher.max_batch_tokens,
            closed_reason=batch.reason,
            queue_wait_s=max((it.stage_s["queue_wait"] for it in items), default=0.0),
            tokenize_s=max((it.stage_s.get("tokenize", 0.0) for it in items), default=0.0),
            infer_s=infer_s,
            postprocess_s=0.0,
            cache=CacheCounts(
                l1_hits=self._hits_since_batch["l1"],
                l2_hits=self._hits_since_batch["l2"],
                batch_hits=len(items) - len(leaders),
                misses=len(leaders),
            ),
            outstanding=len(items),
        )
        self._batch_seq += 1
        self._hits_since_batch = {"l1": 0, "l2": 0, "batch": 0}
        expires = self.wall_clock()
        for row, leader in zip(probs, leaders, strict=True):
            followers = unique[leader.cache_key or id(leader).to_bytes(8, "little")]
            result = self._result_from(row, leader, expires)
            for idx, it in enumerate(followers):
                it.result = result
                it.cache_level = "none" if idx == 0 else "batch"
                it.stage_s["infer"] = infer_s
                it.batch = stats
        postprocess_s = self.clock() - t1
        stats.postprocess_s = postprocess_s
        self.metrics.stage_seconds.labels("postprocess").observe(postprocess_s)
        for it in items:
            it.stage_s["postprocess"] = postprocess_s
            self._remember(it)
            self._complete(it)

    def _predict(self, encoded: Sequence[Encoded]) -> npt.NDArray[np.float32]:
        batch = self.encoder.pad(encoded)
        return predict_split(self.engine, batch, self._on_oom)

    def _on_oom(self) -> None:
        # called from the inference thread: hand the budget change to the event loop, which owns the batcher
        self.metrics.oom_splits_total.inc()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._shrink_budget)

    def _shrink_budget(self) -> None:
        self._batcher.set_token_budget(self.budget.on_oom())

    def _observe_batch(self, batch: Batch[Item], infer_s: float) -> None:
        self.metrics.inference_seconds.labels(self.engine_label).observe(infer_s)
        self.metrics.stage_seconds.labels("infer").observe(infer_s)
        self.metrics.batch_size.observe(len(batch.items))
        self.metrics.batch_tokens.observe(batch.padded_tokens)
        self.metrics.batch_real_tokens.observe(batch.real_tokens)
        if self.config.adaptive:
            self.budget.observe(batch.padded_tokens, infer_s)
            cap = memory_token_budget(self.engine)
            if cap is not None:
                self.budget.cap(cap)
            self._batcher.set_token_budget(self.budget.value)
        self.metrics.token_budget.set(self._batcher.max_batch_tokens)

    async def _isolate_failures(
        self,
        loop: asyncio.AbstractEventLoop,
        leaders: list[Item],
        groups: dict[bytes, list[Item]],
        exc: EmotionStreamError,
    ) -> None:
        """A batch failed: retry each message alone so one poison message does not sink its neighbours."""
        self.metrics.errors_total.labels("infer").inc()
        _log.warning("batch of %d failed (%r); retrying one by one", len(leaders), exc)
        for leader in leaders:
            group = groups[leader.cache_key or id(leader).to_bytes(8, "little")]
            try:
                assert leader.encoded is not None
                probs = await loop.run_in_executor(self._infer_pool, self._predict, [leader.encoded])
            except DeviceOutOfMemoryError:
                raise
            except EmotionStreamError as single:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.config.max_consecutive_failures:
                    raise InfrastructureError(
                        f"{self._consecutive_failures} messages in a row failed inference; engine unusable"
                    ) from single
                for it in group:
                    self._dead_letter(it, "inference_failed", "infer", single)
                continue
            self._consecutive_failures = 0
            result = self._result_from(probs[0], leader, self.wall_clock())
            for idx, it in enumerate(group):
                it.result = result
                it.cache_level = "none" if idx == 0 else "batch"
                it.stage_s.setdefault("infer", 0.0)
                self._remember(it)
                self._complete(it)

    def _result_from(self, row: npt.NDArray[np.float32], item: Item, now_wall: float) -> CachedResult:
        scores = np.asarray(row, dtype=np.float32)
        truncated = bool(item.encoded.truncated) if item.encoded is not None else False
        return CachedResult(
            label_index=int(scores.argmax()),
            scores=scores,
            expires_at=now_wall + self.config.l2_ttl_s,
            truncated=truncated,
        )

    def _remember(self, item: Item) -> None:
        if item.cache_level != "none" or item.cache_key is None or item.result is None:
            return
        if self.l1 is not None:
            self.l1.put(item.cache_key, L1Entry(item.result))

    def remember_l2_hit(self, item: Item, result: CachedResult) -> None:
        """An L2 hit: answer the item with it and keep it in L1 too."""
        item.result, item.cache_level, item.store_l2 = result, "l2", False
        if self.l1 is not None and item.cache_key is not None:
            self.l1.put(item.cache_key, L1Entry(result, {item.source.partition}))

    def _dead_letter(self, item: Item, reason: str, stage: str, error: BaseException) -> None:
        self._mark_dead(item, reason, stage, error)
        self._complete(item)

    def _mark_dead(self, item: Item, reason: str, stage: str, error: BaseException) -> None:
        item.dead = DeadLetter.build(
            reason=reason,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            error=error,
            source=item.source,
            raw_key=item.raw_key,
            raw_value=item.raw_value,
            max_raw_bytes=self.config.max_message_bytes,
            received_at=item.received_wall,
            worker_id=self.config.worker_id,
        )

    # ------------------------------------------------------------------ emit
    async def _emit_loop(self) -> None:
        while True:
            await self._emit_wakeup.wait()
            self._emit_wakeup.clear()
            sent: list[tuple[Item, Awaitable[object]]] = []
            for queue in list(self._order.values()):
                while queue and queue[0].done:
                    item = queue.popleft()
                    sent.append((item, await self._send(item)))
            if sent:
                task = asyncio.create_task(self._await_acks(sent))
                self._ack_tasks.add(task)
                task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Task[None]) -> None:
        self._ack_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failed is None:
            self.failed = task.exception()
            _log.error("producing failed, stopping without committing: %r", self.failed)

    async def _send(self, item: Item) -> Awaitable[object]:
        if item.dead is not None:
            self.metrics.dead_letters_total.labels(item.dead.reason).inc()
            return await self.sink.send_dead_letter(item, item.dead)
        assert item.result is not None and item.message is not None
        if self.config.l2_enabled and item.store_l2 and item.cache_key is not None:
            self.sink.cache_store(item, item.cache_key, item.result)
            entry = self.l1.get(item.cache_key) if self.l1 is not None else None
            if entry is not None:
                entry.l2_partitions.add(item.source.partition)
        return await self.sink.send_event(item, self._event(item))

    def _event(self, item: Item) -> EmotionEvent:
        # Hot path: every field is built from already-validated, typed values, so the records are
        # assembled without re-validation (model_construct); tests validate the output against the schema.
        assert item.result is not None and item.message is not None
        now_wall = self.wall_clock()
        scores = item.result.scores.tolist()
        s = item.stage_s
        msg = item.message
        src = item.source
        return EmotionEvent.model_construct(
            schema_="emotion_event.v1",
            event_id=event_id_for(src.topic, src.partition, src.offset),
            message_id=msg.message_id,
            conversation_id=msg.conversation_id,
            user_id=msg.user_id,
            label=self.labels[item.result.label_index],
            score=scores[item.result.label_index],
            scores=dict(zip(self.labels, scores, strict=True)),
            model=self.model_info,
            cache=_CACHE_INFO[item.cache_level],
            truncated=item.result.truncated,
            timings_ms=EventTimings.model_construct(
                decode=s.get("decode", 0.0) * 1e3,
                cache=s.get("cache", 0.0) * 1e3,
                queue_wait=s.get("queue_wait", 0.0) * 1e3,
                tokenize=s.get("tokenize", 0.0) * 1e3,
                infer=s.get("infer", 0.0) * 1e3,
                postprocess=s.get("postprocess", 0.0) * 1e3,
                total=max(0.0, self.clock() - item.received_mono) * 1e3,
            ),
            source=src,
            sent_at=rfc3339(msg.sent_at.timestamp()),
            received_at=rfc3339(item.received_wall),
            emitted_at=rfc3339(now_wall),
            traceparent=msg.traceparent,
        )

    async def _await_acks(self, sent: list[tuple[Item, Awaitable[object]]]) -> None:
        t0 = self.clock()
        # raises on a produce failure: the offsets stay uncommitted and the worker stops
        await asyncio.gather(*(fut for _, fut in sent))
        now = self.clock()
        for item, _ in sent:
            await self.sink.ack(item)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self._slots.release()
            if item.dead is None:
                self.metrics.events_total.inc()
                self.metrics.end_to_end_seconds.observe(now - item.received_mono)
            stats = item.batch
            if stats is not None:
                stats.outstanding -= 1
                if stats.outstanding == 0:
                    await self._send_stage_metrics(stats, now - t0)
        self.metrics.stage_seconds.labels("produce").observe(now - t0)
        self.metrics.in_flight.set(self._in_flight)

    async def _send_stage_metrics(self, stats: _BatchStats, produce_s: float) -> None:
        record = StageMetrics(
            batch_id=stats.batch_id,
            worker_id=self.config.worker_id,
            engine=self.engine_label,
            device=self.model_info.device,
            size=stats.size,
            real_tokens=stats.real_tokens,
            padded_tokens=stats.padded_tokens,
            token_budget=max(1, stats.token_budget),
            closed_reason=stats.closed_reason,
            stage_ms=StageMs(
                queue_wait=stats.queue_wait_s * 1e3,
                tokenize=stats.tokenize_s * 1e3,
                infer=stats.infer_s * 1e3,
                postprocess=stats.postprocess_s * 1e3,
                produce=produce_s * 1e3,
            ),
            cache=stats.cache,
            emitted_at=rfc3339(self.wall_clock()),
        )
        await self.sink.send_metrics(record)
