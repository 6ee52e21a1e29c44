"""The classifier: tokenise a chunk at a time, batch by count / padded tokens / age, infer off the loop.

```
submit(slots) ─► de-duplicate texts ─► tokenise (thread, one call per chunk) ─► Batcher
                                                                                  │ dispatch
                               on_done(slots, stats) ◄── results ◄── infer (thread pool, split on OOM,
                                                                      retry a failing batch row by row)
```

Dispatch rule (continuous batching, as in text-embeddings-inference): when no batch is running, whatever
is queued runs at once, so a lone message at light load never waits for ``max_wait_s``; while a batch
runs (and ``concurrent_batches`` allows another), the next one starts only when it is full (count or
token cap) or its oldest message has waited ``max_wait_s``. Under a backlog, chunks arrive faster than
batches finish, so batches fill to their caps.

Failure: a batch that raises is retried one message at a time, and a message that fails alone is
dead-lettered (``inference_failed``); ``max_consecutive_failures`` such messages in a row mean the
engine itself is broken, which is fatal. A device out of memory halves the batch until it fits and
shrinks the token budget; a single row that does not fit is fatal (the device is unusable).

Everything here runs on the event loop except the tokenizer and engine calls, which run in threads of
their own (both release the GIL in native code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_app.core.batching import AdaptiveBudget, Batch, Batcher
from stream_app.core.crash_ledger import Coordinates, CrashLedger
from stream_app.core.slots import DeadInfo, Result, Slot
from stream_app.errors import (
    ConfigError,
    DeviceOutOfMemoryError,
    EngineError,
    InfrastructureError,
    TextTooLongError,
)
from stream_app.inference.base import Engine, memory_token_budget, predict_split
from stream_app.inference.tokenize import Encoded, TextEncoder
from stream_app.metrics import Metrics

if TYPE_CHECKING:
    from stream_app.tracing import BatchTracer

__all__ = ["BatchStats", "Classifier", "ClassifierConfig"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """Plain values the classifier needs (built from the settings by the worker).

    Attributes:
        max_batch_size: Most messages in one batch.
        max_batch_tokens: Initial padded-token budget of a batch.
        max_wait_s: While a batch runs, the next closes at the latest this long after its oldest message.
        capacity: Most messages queued for batching (the pipeline's in-flight bound keeps below it).
        group_by_length: Fill batches with messages of similar token length.
        adaptive: Adapt the token budget to ``target_batch_s``.
        target_batch_s: Batch-time target of the adaptive budget.
        min_batch_tokens: Floor of the adaptive budget.
        max_batch_tokens_ceiling: Ceiling of the adaptive budget.
        overlong_reject: Dead-letter texts over the token limit instead of truncating them.
        concurrent_batches: Batches inferred at once, each in its own thread.
        max_consecutive_failures: Messages failing alone in a row before the engine is declared broken.
    """

    max_batch_size: int
    max_batch_tokens: int
    max_wait_s: float
    capacity: int
    group_by_length: bool = True
    adaptive: bool = True
    target_batch_s: float = 0.1
    min_batch_tokens: int = 1
    max_batch_tokens_ceiling: int = 1 << 20
    overlong_reject: bool = False
    concurrent_batches: int = 1
    max_consecutive_failures: int = 8


@dataclass(slots=True, eq=False)
class BatchStats:
    """One inference batch, for its ``stage_metrics.v1`` record and the batch histograms."""

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
    batch_hits: int
    l1_hits: int = 0
    l2_hits: int = 0
    outstanding: int = 0


def _coords(slots: Sequence[Slot]) -> list[Coordinates]:
    return [(s.chunk.topic, s.lane.partition, s.offset) for s in slots]


class _NativeGate:
    """Native work (tokenizer and engine calls) runs concurrently, except a suspect's, which runs alone.

    A suspect was in native code when the process died. If it kills the process again, the crash ledger
    must find it alone in flight: records tokenised or inferred at the same moment would get a strike too,
    and at ``max_strikes`` be dead-lettered with it. Exclusive work waiting goes first: no shared work
    starts meanwhile. All of it runs on the event loop (no lock needed between the checks).
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool) -> AsyncIterator[None]:
        if exclusive:
            self._waiting += 1
            try:
                await self._until(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
                self._notify()
            self._exclusive = True
        else:
            await self._until(lambda: not self._exclusive and self._waiting == 0)
            self._shared += 1
        try:
            yield
        finally:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._notify()


class Classifier:
    """Tokenise, batch and infer slots; hand results back through ``on_done``.

    Args:
        engine: The inference engine (thread-safe ``predict``).
        encoder: The tokenizer wrapper.
        config: Batching and failure settings.
        metrics: Batch histograms and counters.
        on_done: Called on the loop with slots that have their ``result`` or ``dead`` verdict (leaders
            and their in-flight duplicates) and the batch they came from (None for tokenizer verdicts).
        on_fatal: Called once with the error when the engine or device is unusable.
        ledger: Records native work for poison-record detection (None: off).
        clock: Monotonic seconds (injected in tests).
        tracer: Makes a span of each finished batch (None: tracing off, the default).
    """

    def __init__(
        self,
        *,
        engine: Engine,
        encoder: TextEncoder,
        config: ClassifierConfig,
        metrics: Metrics,
        on_done: Callable[[list[Slot], BatchStats | None], None],
        on_fatal: Callable[[BaseException], None],
        ledger: CrashLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer: BatchTracer | None = None,
    ) -> None:
        if config.concurrent_batches < 1:
            raise ConfigError(f"concurrent_batches must be >= 1, got {config.concurrent_batches}")
        self.engine = engine
        self.encoder = encoder
        self.config = config
        self.metrics = metrics
        self.on_done = on_done
        self.on_fatal = on_fatal
        self.ledger = ledger
        self.clock = clock
        self.tracer = tracer
        self.batcher = Batcher[Slot](
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_s,
            capacity=config.capacity,
            group_by_length=config.group_by_length,
            clock=clock,
        )
        self.budget = AdaptiveBudget(
            initial=config.max_batch_tokens,
            minimum=min(config.min_batch_tokens, config.max_batch_tokens),
            maximum=max(config.max_batch_tokens_ceiling, config.max_batch_tokens),
            target_s=config.target_batch_s,
        )
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._gate = _NativeGate()
        self._infer_pool = ThreadPoolExecutor(config.concurrent_batches, thread_name_prefix="infer")
        # texts being inferred right now (or queued): later duplicates wait for the same answer
        self._groups: dict[bytes, list[Slot]] = {}
        self._isolated: list[Slot] = []
        self._running = 0
        self._batch_seq = 0
        #: cache hits since the last batch closed (the pipeline counts them; stage metrics report them)
        self.hits_since_batch = {"l1": 0, "l2": 0}
        self._consecutive_failures = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.last_progress = clock()
        engine_info = engine.info
        self._engine_label = f"{engine_info.kind}-{engine_info.precision}"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._dispatch_loop(), name="classifier-dispatch")
        self._task.add_done_callback(self._on_task_done)

    async def stop(self) -> None:
        """Stop dispatching; running batches are abandoned (their offsets were never committed)."""
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
                _log.debug("classifier task ended with %r while stopping", exc)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is not None:
            self.on_fatal(exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    @property
    def queued(self) -> int:
        """Messages waiting to be batched."""
        return len(self.batcher) + len(self._isolated)

    @property
    def running(self) -> int:
        """Batches being inferred right now."""
        return self._running

    # ------------------------------------------------------------------ intake
    def submit(self, slots: list[Slot]) -> None:
        """Take valid slots that missed the caches; tokenises them in the background (one call)."""
        leaders: list[Slot] = []
        groups = self._groups
        for s in slots:
            key = s.cache_key
            if key is not None:
                group = groups.get(key)
                if group is not None:
                    s.leader = group[0]
                    group.append(s)
                    continue
                groups[key] = [s]
            leaders.append(s)
        if not leaders:
            return
        suspects = [s for s in leaders if s.isolate]
        if suspects:
            # A suspect (in native code at an earlier crash) is tokenised alone, as it is inferred alone: if
            # the tokenizer is what kills the process, only the suspect gets the strike, not its chunk.
            leaders = [s for s in leaders if not s.isolate]
            for s in suspects:
                self._spawn(self._tokenize([s]), "classifier-tokenize")
        if leaders:
            self._spawn(self._tokenize(leaders), "classifier-tokenize")

    async def _tokenize(self, leaders: list[Slot]) -> None:
        assert self._loop is not None
        t0 = self.clock()
        async with self._gate.hold(exclusive=any(s.isolate for s in leaders)):
            encoded = await self._loop.run_in_executor(self._tokenize_pool, self._encode_in_thread, leaders)
        spent = self.clock() - t0
        self.metrics.stage_seconds.labels("tokenize").observe(spent)
        now = self.clock()
        verdicts: list[Slot] = []
        queued: list[tuple[Slot, int]] = []
        reject = self.config.overlong_reject
        chunk = None
        for s, enc in zip(leaders, encoded, strict=True):
            if s.chunk is not chunk:
                chunk = s.chunk
                chunk.tokenize_s = spent
                chunk.enqueued_mono = now
            if isinstance(enc, BaseException):
                s.dead = DeadInfo("inference_failed", "tokenize", enc)
                verdicts.append(s)
                continue
            s.encoded = enc
            if reject and enc.truncated:
                error = TextTooLongError(f"text is over the {self.encoder.max_length}-token limit")
                s.dead = DeadInfo("text_too_long", "tokenize", error)
                verdicts.append(s)
            elif s.isolate:
                self._isolated.append(s)
            else:
                queued.append((s, enc.n_tokens))
        if queued:
            self.batcher.add_many(queued)
        if verdicts:
            self._deliver(verdicts, None)
        self._wakeup.set()

    def _encode_in_thread(self, leaders: list[Slot]) -> list[Encoded | BaseException]:
        ledger = self.ledger
        token = ledger.begin(_coords(leaders)) if ledger is not None else None
        texts = [s.text for s in leaders]
        try:
            out: list[Encoded | BaseException] = list(self.encoder.encode(texts))
        except Exception:  # noqa: BLE001 -- one text broke the batch call: find it by encoding each alone
            out = []
            for text in texts:
                try:
                    out.extend(self.encoder.encode([text]))
                except Exception as exc:  # noqa: BLE001 -- that text's own failure, dead-lettered
                    out.append(exc)
        if ledger is not None and token is not None:
            ledger.end(token)
        return out

    # ------------------------------------------------------------------ dispatch
    async def _dispatch_loop(self) -> None:
        batcher = self.batcher
        limit = self.config.concurrent_batches
        while True:
            self._wakeup.clear()
            if self._isolated and self._running == 0:
                slot = self._isolated.pop(0)
                self._start(None, [slot])
                continue
            now = self.clock()
            n = len(batcher)
            if n and self._running < limit and (self._running == 0 or batcher.ready(now)):
                batch = batcher.take(now)
                assert batch is not None
                self._start(batch, list(batch.items))
                continue
            timeout: float | None = None
            if n and self._running < limit:
                deadline = batcher.deadline()
                if deadline is not None:
                    timeout = max(0.0, deadline - now)
            if timeout is None:
                await self._wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _start(self, batch: Batch[Slot] | None, leaders: list[Slot]) -> None:
        self._running += 1
        self._spawn(self._run(batch, leaders), "classifier-batch")

    async def _run(self, batch: Batch[Slot] | None, leaders: list[Slot]) -> None:
        assert self._loop is not None
        try:
            closed = batch.closed_at if batch is not None else self.clock()
            queue_wait = max((closed - s.chunk.enqueued_mono for s in leaders), default=0.0)
            self.metrics.queue_wait_seconds.observe(max(0.0, queue_wait))
            t0 = self.clock()
            try:
                async with self._gate.hold(exclusive=any(s.isolate for s in leaders)):
                    rows, labels = await self._loop.run_in_executor(self._infer_pool, self._infer_in_thread, leaders)
            except DeviceOutOfMemoryError as exc:
                raise InfrastructureError(f"one message does not fit on the device: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 -- a failing batch is retried row by row below
                await self._isolate(leaders, exc)
                return
            infer_s = self.clock() - t0
            self._consecutive_failures = 0
            self.last_progress = self.clock()
            stats = self._observe(batch, leaders, infer_s, queue_wait)
            t1 = self.clock()
            for s, row, label in zip(leaders, rows, labels, strict=True):
                s.result = Result(label, tuple(row), s.encoded.truncated if s.encoded is not None else False)
            stats.postprocess_s = self.clock() - t1
            if self.tracer is not None:
                self.tracer.on_batch(leaders, stats)
            self._deliver(leaders, stats)
        finally:
            self._running -= 1
            self._wakeup.set()

    def _infer_in_thread(self, leaders: list[Slot]) -> tuple[list[list[float]], list[int]]:
        ledger = self.ledger
        token = ledger.begin(_coords(leaders)) if ledger is not None else None
        encoded = [s.encoded for s in leaders]
        try:
            probs = np.asarray(predict_split(self.engine, self.encoder.pad(encoded), self._on_oom))  # type: ignore[arg-type]
            if probs.shape != (len(leaders), len(self.engine.labels)):
                raise EngineError(f"the engine returned shape {probs.shape} for {len(leaders)} rows")
            if not (np.isfinite(probs).all() and (probs >= 0.0).all() and (probs <= 1.0).all()):
                raise EngineError(
                    "the engine returned scores that are not probabilities (NaN, infinite or out of 0..1)"
                )
        except BaseException:
            # an exception is not a crash: these records are out of native code (their strikes stay)
            if ledger is not None and token is not None:
                ledger.end(token)
            raise
        rows: list[list[float]] = probs.tolist()
        labels: list[int] = probs.argmax(axis=1).tolist()
        if ledger is not None and token is not None:
            ledger.end(token, succeeded=_coords(leaders) if ledger.has_suspects else ())
        return rows, labels

    async def _isolate(self, leaders: list[Slot], error: BaseException) -> None:
        """A batch failed: infer each message alone so one poison message does not sink its neighbours."""
        assert self._loop is not None
        self.metrics.errors_total.labels("infer").inc()
        _log.warning("batch of %d failed (%r); retrying one by one", len(leaders), error)
        for s in leaders:
            try:
                async with self._gate.hold(exclusive=s.isolate):
                    rows, labels = await self._loop.run_in_executor(self._infer_pool, self._infer_in_thread, [s])
            except DeviceOutOfMemoryError as exc:
                raise InfrastructureError(f"one message does not fit on the device: {exc}") from exc
            except Exception as exc:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.config.max_consecutive_failures:
                    raise InfrastructureError(
                        f"{self._consecutive_failures} messages in a row failed inference; engine unusable"
                    ) from exc
                s.dead = DeadInfo("inference_failed", "infer", exc)
                self._deliver([s], None)
                continue
            self._consecutive_failures = 0
            self.last_progress = self.clock()
            s.result = Result(labels[0], tuple(rows[0]), s.encoded.truncated if s.encoded is not None else False)
            self._deliver([s], None)

    def _on_oom(self) -> None:
        # called from an inference thread: hand the budget change to the loop, which owns the batcher
        self.metrics.oom_splits_total.inc()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._shrink_budget)

    def _shrink_budget(self) -> None:
        self.batcher.set_token_budget(self.budget.on_oom())

    def _observe(self, batch: Batch[Slot] | None, leaders: list[Slot], infer_s: float, queue_wait: float) -> BatchStats:
        m = self.metrics
        tokens = [s.encoded.n_tokens for s in leaders if s.encoded is not None]
        real = sum(tokens)
        padded = max(tokens, default=0) * len(tokens)
        m.inference_seconds.labels(self._engine_label).observe(infer_s)
        m.stage_seconds.labels("infer").observe(infer_s)
        m.batch_size.observe(len(leaders))
        m.batch_tokens.observe(padded)
        m.batch_real_tokens.observe(real)
        if self.config.adaptive and padded > 0 and batch is not None:
            self.budget.observe(padded, infer_s)
            cap = memory_token_budget(self.engine)
            if cap is not None:
                self.budget.cap(cap)
            self.batcher.set_token_budget(self.budget.value)
        m.token_budget.set(self.batcher.max_batch_tokens)
        stats = BatchStats(
            batch_id=self._batch_seq,
            size=len(leaders),
            real_tokens=real,
            padded_tokens=padded,
            token_budget=max(1, self.batcher.max_batch_tokens),
            closed_reason=batch.reason if batch is not None else "drain",
            queue_wait_s=max(0.0, queue_wait),
            tokenize_s=max((s.chunk.tokenize_s for s in leaders), default=0.0),
            infer_s=infer_s,
            postprocess_s=0.0,
            batch_hits=0,
            l1_hits=self.hits_since_batch["l1"],
            l2_hits=self.hits_since_batch["l2"],
        )
        self.hits_since_batch = {"l1": 0, "l2": 0}
        self._batch_seq += 1
        return stats

    # ------------------------------------------------------------------ results
    def _deliver(self, leaders: list[Slot], stats: BatchStats | None) -> None:
        """Copy each leader's verdict to its waiting duplicates and hand them all to ``on_done``."""
        out: list[Slot] = []
        groups = self._groups
        for s in leaders:
            out.append(s)
            key = s.cache_key
            group = groups.pop(key, None) if key is not None else None
            if group is None or len(group) == 1:
                continue
            for f in group[1:]:
                f.result = s.result
                f.dead = s.dead
                f.encoded = s.encoded
                f.level = "batch"
                out.append(f)
        if stats is not None:
            stats.batch_hits = len(out) - len(leaders)
            stats.outstanding = len(out)
            for s in out:
                s.batch = stats
        self.on_done(out, stats)
