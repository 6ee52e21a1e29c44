"""The pipeline with a fake engine and a fake sink: order, de-duplication, caching, poison and acks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest

from stream_app.cache.admission import AlwaysAdmit
from stream_app.cache.codec import CachedResult
from stream_app.cache.lru import TtlLru
from stream_app.errors import EngineError
from stream_app.inference.base import EngineInfo
from stream_app.inference.tokenize import Encoded, EncodedBatch, pad
from stream_app.metrics import Metrics
from stream_app.pipeline import Item, L1Entry, Pipeline, PipelineConfig
from stream_app.records import DeadLetter, EmotionEvent, SourceRef, StageMetrics

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
POISON_ID = 999


class FakeEncoder:
    """One token per word (+2 specials); the word "poison" becomes POISON_ID."""

    def __init__(self, max_length: int = 16) -> None:
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        out = []
        for text in texts:
            ids = [101] + [POISON_ID if w == "poison" else 1000 + len(w) for w in text.split()] + [102]
            truncated = len(ids) > self.max_length
            ids = ids[: self.max_length]
            out.append(Encoded(input_ids=tuple(ids), n_tokens=len(ids), truncated=truncated))
        return out

    def pad(self, items: Sequence[Encoded]) -> EncodedBatch:
        return pad(items)


class FakeEngine:
    """Deterministic probabilities from the ids; raises on a row holding POISON_ID."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            kind="torch", runtime="fake", precision="fp32", device="cpu", model_name="m", model_version="1"
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS

    def predict(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(batch.size)
        if (batch.input_ids == POISON_ID).any():
            raise EngineError("poison row")
        rows = []
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            seed = hashlib.sha256(ids[mask.astype(bool)].tobytes()).digest()
            logits = np.frombuffer(seed[: len(LABELS)], dtype=np.uint8).astype(np.float32) / 40.0
            e = np.exp(logits - logits.max())
            rows.append(e / e.sum())
        return np.asarray(rows, dtype=np.float32)

    def close(self) -> None:
        pass


class FakeSink:
    def __init__(self, *, hold: bool = False, fail: bool = False) -> None:
        self.events: list[EmotionEvent] = []
        self.dead: list[DeadLetter] = []
        self.metrics: list[StageMetrics] = []
        self.acked: list[int] = []
        self.stored: list[tuple[int, bytes, CachedResult]] = []
        self.pending: list[asyncio.Future[object]] = []
        self.hold = hold
        self.fail = fail

    def _future(self) -> Awaitable[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(ConnectionError("broker gone"))
        elif self.hold:
            self.pending.append(fut)
        else:
            fut.set_result(None)
        return fut

    async def send_event(self, item: Item, event: EmotionEvent) -> Awaitable[object]:
        self.events.append(event)
        return self._future()

    async def send_dead_letter(self, item: Item, dead: DeadLetter) -> Awaitable[object]:
        self.dead.append(dead)
        return self._future()

    async def send_metrics(self, record: StageMetrics) -> None:
        self.metrics.append(record)

    async def ack(self, item: Item) -> None:
        self.acked.append(item.source.offset)

    def cache_store(self, item: Item, key: bytes, value: CachedResult) -> None:
        self.stored.append((item.source.partition, key, value))


def _config(**over: Any) -> PipelineConfig:
    base: dict[str, Any] = dict(
        worker_id="w",
        max_batch_size=8,
        max_batch_tokens=4096,
        max_wait_s=0.005,
        queue_capacity=64,
        group_by_length=True,
        adaptive=False,
        target_batch_s=0.05,
        min_batch_tokens=16,
        max_batch_tokens_ceiling=8192,
        overlong_reject=False,
        max_message_bytes=10_000,
        max_text_chars=500,
        l2_ttl_s=600.0,
        l2_enabled=True,
    )
    base.update(over)
    return PipelineConfig(**base)


def _raw(i: int, text: str, conv: str = "c") -> bytes:
    return orjson.dumps(
        {
            "message_id": f"m{i}",
            "conversation_id": conv,
            "user_id": "u",
            "text": text,
            "sent_at": "2026-01-01T00:00:00Z",
        }
    )


def _pipeline(sink: FakeSink, engine: FakeEngine | None = None, l1: bool = True, **over: Any) -> Pipeline:
    return Pipeline(
        engine=engine or FakeEngine(),
        encoder=FakeEncoder(),  # type: ignore[arg-type]
        sink=sink,
        config=_config(**over),
        metrics=Metrics(),
        l1=TtlLru[bytes, L1Entry](max_entries=100, ttl_s=60.0) if l1 else None,
        admission=AlwaysAdmit(),
    )


async def _run(p: Pipeline, raws: list[tuple[int, int, bytes]]) -> None:
    await p.start()
    try:
        for partition, offset, raw in raws:
            src = SourceRef(topic="in", partition=partition, offset=offset)
            await p.submit(p.make_item(object(), src, b"k", raw))
        await p.drain(timeout_s=10)
    finally:
        await p.stop()


async def test_events_keep_source_order_per_partition_despite_length_grouping() -> None:
    sink = FakeSink()
    p = _pipeline(sink)
    words = ["a", "b c d e f g h i j k", "l m", "n o p q r s", "t"]
    raws = [(off % 2, off, _raw(off, " ".join([words[off % 5], str(off)]))) for off in range(60)]
    await _run(p, raws)
    assert len(sink.events) == 60
    for part in (0, 1):
        offsets = [e.source.offset for e in sink.events if e.source.partition == part]
        assert offsets == sorted(offsets) and len(offsets) == 30
    assert sorted(sink.acked) == list(range(60))
    schema = json.loads((SCHEMAS / "emotion_event.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for event in sink.events:
        validator.validate(orjson.loads(event.to_json()))


async def test_identical_texts_in_a_batch_are_inferred_once_and_scores_match() -> None:
    sink = FakeSink()
    engine = FakeEngine()
    p = _pipeline(sink, engine, l1=False)
    raws = [(0, i, _raw(i, "thank you" if i % 2 else "ok then")) for i in range(8)]
    await _run(p, raws)
    assert sum(engine.calls) == 2  # two distinct texts
    levels = sorted(e.cache.level for e in sink.events)
    assert levels.count("none") == 2 and levels.count("batch") == 6
    by_text: dict[str, set[tuple[float, ...]]] = {}
    for e in sink.events:
        by_text.setdefault(e.message_id[-1], set()).add(tuple(e.scores.values()))
    assert all(len(v) == 1 for v in by_text.values())


async def test_l1_hit_event_equals_the_miss_that_filled_it() -> None:
    sink = FakeSink()
    engine = FakeEngine()
    p = _pipeline(sink, engine)
    await p.start()
    try:
        first = p.make_item(object(), SourceRef(topic="in", partition=0, offset=0), b"k", _raw(0, "I  love\tthis"))
        await p.submit(first)
        await p.drain()
        # whitespace differs, normalisation makes it the same key
        second = p.make_item(object(), SourceRef(topic="in", partition=1, offset=0), b"k", _raw(1, "I love this"))
        assert second.cache_level == "l1"
        await p.submit(second)
        await p.drain()
    finally:
        await p.stop()
    miss, hit = sink.events
    assert (miss.cache.level, hit.cache.level) == ("none", "l1")
    assert (miss.label, miss.scores) == (hit.label, hit.scores)
    assert sum(engine.calls) == 1
    # stored in L2 for both partitions: the miss's own, and the hit's (promotion of a popular text)
    assert [(part, r.scores.tolist()) for part, _, r in sink.stored] == [
        (0, list(miss.scores.values())),
        (1, list(miss.scores.values())),
    ]


async def test_poison_message_is_dead_lettered_and_neighbours_survive() -> None:
    sink = FakeSink()
    p = _pipeline(sink)
    raws = [(0, i, _raw(i, "this is poison" if i == 3 else f"fine text {i}")) for i in range(6)]
    await _run(p, raws)
    assert [d.reason for d in sink.dead] == ["inference_failed"]
    assert sink.dead[0].source.offset == 3
    assert sorted(e.source.offset for e in sink.events) == [0, 1, 2, 4, 5]
    assert sorted(sink.acked) == list(range(6))


async def test_bad_input_goes_to_dead_letters_with_reasons() -> None:
    sink = FakeSink()
    p = _pipeline(sink, overlong_reject=True)
    raws = [
        (0, 0, b"{nope"),
        (0, 1, _raw(1, "   ")),
        (0, 2, b"x" * 20_000),
        (0, 3, _raw(3, "word " * 30)),  # over the fake encoder's 16 tokens, rejected by policy
        (0, 4, _raw(4, "fine")),
    ]
    await _run(p, raws)
    assert [d.reason for d in sink.dead] == ["undecodable", "empty_text", "too_large", "text_too_long"]
    assert [e.source.offset for e in sink.events] == [4]
    assert sorted(sink.acked) == [0, 1, 2, 3, 4]


async def test_truncation_is_flagged_when_policy_truncates() -> None:
    sink = FakeSink()
    p = _pipeline(sink)
    await _run(p, [(0, 0, _raw(0, "word " * 30)), (0, 1, _raw(1, "short"))])
    assert [e.truncated for e in sink.events] == [True, False]


async def test_offsets_are_acked_only_after_the_broker_acknowledges() -> None:
    sink = FakeSink(hold=True)
    p = _pipeline(sink)
    await p.start()
    try:
        for i in range(3):
            await p.submit(p.make_item(object(), SourceRef(topic="in", partition=0, offset=i), b"k", _raw(i, f"t {i}")))
        for _ in range(200):
            if len(sink.pending) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(sink.events) == 3
        assert sink.acked == []
        for fut in sink.pending:
            fut.set_result(None)
        await p.drain()
        assert sorted(sink.acked) == [0, 1, 2]
    finally:
        await p.stop()


async def test_a_produce_failure_stops_without_acking() -> None:
    sink = FakeSink(fail=True)
    p = _pipeline(sink)
    await p.start()
    try:
        await p.submit(p.make_item(object(), SourceRef(topic="in", partition=0, offset=0), b"k", _raw(0, "hello")))
        for _ in range(200):
            if p.failed is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(p.failed, ConnectionError)
        assert sink.acked == []
    finally:
        await p.stop()


async def test_stage_metrics_account_for_every_inferred_message() -> None:
    sink = FakeSink()
    p = _pipeline(sink, l1=False)
    await _run(p, [(0, i, _raw(i, f"text number {i % 10}")) for i in range(40)])
    inferred = sum(m.size for m in sink.metrics)
    batch_hits = sum(m.cache.batch_hits for m in sink.metrics)
    assert inferred + batch_hits == 40
    assert all(m.size <= 8 for m in sink.metrics)
    assert [m.batch_id for m in sink.metrics] == sorted(m.batch_id for m in sink.metrics)


class OverlapEngine(FakeEngine):
    """Records how many predict calls overlap; the first batch is the slowest, so batches finish out of order."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def predict(self, batch: EncodedBatch) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            first = not self.calls
        try:
            time.sleep(0.08 if first else 0.01)
            return super().predict(batch)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("concurrent", [1, 2])
async def test_concurrent_batches_overlap_and_events_stay_in_source_order(concurrent: int) -> None:
    sink = FakeSink()
    engine = OverlapEngine()
    p = _pipeline(sink, engine, l1=False, concurrent_batches=concurrent, max_batch_size=4, max_wait_s=0.001)
    raws = [(off % 2, off, _raw(off, f"text number {off} " + "x " * (off % 7))) for off in range(40)]
    await _run(p, raws)
    assert engine.most_at_once == concurrent
    assert sorted(e.source.offset for e in sink.events) == list(range(40))
    for part in (0, 1):
        offsets = [e.source.offset for e in sink.events if e.source.partition == part]
        assert offsets == sorted(offsets)
    assert sorted(sink.acked) == list(range(40))


@pytest.mark.parametrize("full_only", [True, False])
async def test_with_full_only_a_second_batch_waits_unless_full(full_only: bool) -> None:
    """Two concurrent loops, a trickle of messages (never a full batch): with full_only no batch closed by
    age overlaps the running one; without it they do."""
    sink = FakeSink()
    engine = OverlapEngine()
    p = _pipeline(
        sink,
        engine,
        l1=False,
        concurrent_batches=2,
        max_batch_size=8,
        max_wait_s=0.002,
        overlap_full_batches_only=full_only,
    )
    await p.start()
    try:
        for off in range(12):
            src = SourceRef(topic="in", partition=0, offset=off)
            await p.submit(p.make_item(object(), src, b"k", _raw(off, f"trickle {off}")))
            await asyncio.sleep(0.02)
        await p.drain(timeout_s=10)
    finally:
        await p.stop()
    assert sorted(e.source.offset for e in sink.events) == list(range(12))
    assert engine.most_at_once == (1 if full_only else 2)
