"""The core pipeline with a fake engine and a list sink: one outcome per record, order, acks, failures."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from stream_app.core.crash_ledger import CrashLedger
from stream_app.core.pipeline import Pipeline
from stream_app.metrics import Metrics
from tests.unit.core.fakes import DictL2, FakeEncoder, FakeEngine, ListSink, Rec, build, raw

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


async def _drive(p: Pipeline, chunks: list[dict[int, list[Rec]]], *, timeout_s: float = 10.0) -> None:
    await p.start()
    try:
        for chunk in chunks:
            await p.feed("in", chunk)
        assert await p.drain(timeout_s), f"not drained: {p.in_flight} in flight"
        await asyncio.sleep(0.02)  # let the stage-metrics outbox flush
        p.emitter.request_flush()
        await asyncio.sleep(0.02)
    finally:
        await p.stop()


def _sources(docs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(d["source"]["partition"], d["source"]["offset"]) for d in docs]


async def test_every_record_one_outcome_in_source_order_and_offsets_committable() -> None:
    sink = ListSink()
    p = build(sink)
    words = ["a", "b c d e f g h i j k", "l m", "n o p q r s", "t"]
    chunks = [
        {part: [Rec(off, raw(off, f"{words[off % 5]} {off}")) for off in range(start, start + 10)] for part in (0, 1)}
        for start in (0, 10, 20)
    ]
    await _drive(p, chunks)
    events = sink.docs("events")
    assert len(events) == 60
    validator = _validator("emotion_event.v1")
    for doc in events:
        validator.validate(doc)
    for part in (0, 1):
        offsets = [o for pp, o in _sources(events) if pp == part]
        assert offsets == list(range(30))
    assert p.committable() == {0: 30, 1: 30}
    assert [r.key for t, r in sink.sent if t == "events"] == [b"c"] * 60
    stage = sink.docs("metrics")
    sm = _validator("stage_metrics.v1")
    for doc in stage:
        sm.validate(doc)
    assert sum(d["size"] + d["cache"]["batch_hits"] for d in stage) == sum(
        1 for d in events if d["cache"]["level"] in ("none", "batch")
    )


async def test_repeats_are_inferred_once_and_get_identical_scores() -> None:
    sink = ListSink()
    engine = FakeEngine()
    p = build(sink, engine=engine, l1=False)
    chunk = {0: [Rec(i, raw(i, "thank you" if i % 2 else "ok then")) for i in range(8)]}
    await _drive(p, [chunk])
    assert sum(engine.calls) == 2
    events = sink.docs("events")
    levels = sorted(d["cache"]["level"] for d in events)
    assert levels.count("none") == 2 and levels.count("batch") == 6
    by_text: dict[int, set[tuple[float, ...]]] = {}
    for d in events:
        by_text.setdefault(int(d["message_id"][1:]) % 2, set()).add(tuple(d["scores"].values()))
    assert all(len(v) == 1 for v in by_text.values())


async def test_l1_and_l2_hits_equal_the_miss_that_filled_them() -> None:
    sink = ListSink()
    engine = FakeEngine()
    l2 = DictL2()
    p = build(sink, engine=engine, l2=l2)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "I  love\tthis"))]})
        assert await p.drain(5)
        await p.feed("in", {1: [Rec(0, raw(1, "I love this"))]})  # same text after normalisation
        assert await p.drain(5)
    finally:
        await p.stop()
    miss, hit = sink.docs("events")
    assert (miss["cache"]["level"], hit["cache"]["level"]) == ("none", "l1")
    assert (miss["label"], miss["scores"]) == (hit["label"], hit["scores"])
    assert sum(engine.calls) == 1
    assert sorted(part for part, _ in l2.data) == [0, 1]  # the miss's partition, and promoted to the hit's
    # a new worker (empty L1) answers from L2 with the very same floats
    sink2 = ListSink()
    engine2 = FakeEngine()
    p2 = build(sink2, engine=engine2, l2=l2)
    await _drive(p2, [{1: [Rec(5, raw(2, "I love this"))]}])
    (from_l2,) = sink2.docs("events")
    assert from_l2["cache"]["level"] == "l2" and from_l2["scores"] == miss["scores"]
    assert engine2.calls == []


async def test_bad_input_and_a_poison_text_are_dead_lettered_with_reasons() -> None:
    sink = ListSink()
    p = build(sink, overlong_reject=True)
    recs = [
        Rec(0, b"{nope"),
        Rec(1, raw(1, "   ")),
        Rec(2, b"x" * 20_000),
        Rec(3, raw(3, "word " * 30)),  # over the fake encoder's 16 tokens, rejected by policy
        Rec(4, raw(4, "fine")),
        Rec(5, None),  # a tombstone
        Rec(6, raw(6, "this is poison")),
        Rec(7, raw(7, "unencodable text")),
        Rec(8, raw(8, "fine too")),
    ]
    await _drive(p, [{0: recs}])
    dead = {d["source"]["offset"]: (d["reason"], d["stage"]) for d in sink.docs("dlq")}
    assert dead == {
        0: ("undecodable", "decode"),
        1: ("empty_text", "validate"),
        2: ("too_large", "decode"),
        3: ("text_too_long", "tokenize"),
        5: ("undecodable", "decode"),
        6: ("inference_failed", "infer"),
        7: ("inference_failed", "tokenize"),
    }
    assert [o for _, o in _sources(sink.docs("events"))] == [4, 8]
    dl = _validator("dead_letter.v1")
    for d in sink.docs("dlq"):
        dl.validate(d)
    assert p.committable() == {0: 9}


async def test_outputs_leave_in_delivery_order_even_when_hits_finish_first() -> None:
    sink = ListSink()
    p = build(sink, engine=FakeEngine(delay_s=0.05))
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "warm me up"))]})
        assert await p.drain(5)
        # 1 is slow (inferred), 2 is an L1 hit, 3 is bad: 2 and 3 must wait for 1
        await p.feed("in", {0: [Rec(1, raw(1, "new text")), Rec(2, raw(2, "warm me up")), Rec(3, b"{bad")]})
        assert await p.drain(5)
    finally:
        await p.stop()
    order = [(t, orjson.loads(r.value)["source"]["offset"]) for t, r in sink.sent if t in ("events", "dlq")]
    assert order == [("events", 0), ("events", 1), ("events", 2), ("dlq", 3)]


async def test_offsets_commit_only_after_the_broker_acknowledges() -> None:
    sink = ListSink(hold=True)
    p = build(sink)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"t {i}")) for i in range(3)]})
        for _ in range(200):
            if len(sink.pending) == 1:
                break
            await asyncio.sleep(0.01)
        assert p.committable() == {}
        assert p.in_flight == 3
        sink.pending[0].set_result(None)
        assert await p.drain(5)
        assert p.committable() == {0: 3}
        p.mark_committed({0: 3})
        assert p.committable() == {}
    finally:
        await p.stop()


async def test_a_later_group_acked_first_does_not_move_the_offset_past_an_earlier_one() -> None:
    sink = ListSink(hold=True, batch_size=100)
    p = build(sink)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, b"{bad")]})
        await asyncio.sleep(0.05)
        await p.feed("in", {0: [Rec(1, b"{bad")]})
        for _ in range(200):
            if len(sink.pending) == 2:
                break
            await asyncio.sleep(0.01)
        first, second = sink.pending
        second.set_result(None)
        await asyncio.sleep(0.01)
        assert p.committable() == {}
        first.set_result(None)
        await asyncio.sleep(0.01)
        assert p.committable() == {0: 2}
    finally:
        await p.stop()


async def test_a_refused_record_becomes_a_dead_letter_and_its_neighbours_are_sent() -> None:
    sink = ListSink(reject_when=lambda topic, r: topic == "events" and b'"m2"' in r.value)
    p = build(sink)
    await _drive(p, [{0: [Rec(i, raw(i, f"text {i}")) for i in range(5)]}])
    assert sorted(o for _, o in _sources(sink.docs("events"))) == [0, 1, 3, 4]
    (dead,) = sink.docs("dlq")
    assert (dead["reason"], dead["stage"], dead["source"]["offset"]) == ("output_failed", "output", 2)
    assert dead["raw_omitted"] is True and not dead["raw_value_b64"]  # the reduced form
    assert p.committable() == {0: 5}


async def test_a_swapped_key_and_value_makes_a_dead_letter_that_fits_the_smallest_record_limit() -> None:
    from stream_app.core.headers import headers_size

    limit = 32 * 1024
    sink = ListSink()
    p = build(sink, max_record_bytes=limit)
    doc = orjson.loads(raw(0, "x" * 400_000))
    swapped = Rec(
        0,
        b"conv-demo-3",
        key=orjson.dumps(doc),
        headers=(("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),),
    )
    await _drive(p, [{0: [swapped, Rec(1, raw(1, "hello"))]}])
    assert [o for _, o in _sources(sink.docs("events"))] == [1]
    (dead,) = sink.docs("dlq")
    assert (dead["reason"], dead["key_hashed"], dead["raw_key_truncated"]) == ("undecodable", True, True)
    for topic, r in sink.sent:
        if topic == "dlq":
            assert r.key is not None and r.key.startswith(b"sha256:")
            assert len(r.value) + len(r.key) + headers_size(r.headers) <= limit
            assert dict(r.headers)["traceparent"].startswith(b"00-1111")


async def test_a_broken_broker_is_fatal_and_nothing_is_committable() -> None:
    sink = ListSink(fail_with=ConnectionError("broker gone"))
    fatal: list[BaseException] = []
    p = build(sink, fatal=fatal)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "hello"))]})
        for _ in range(200):
            if fatal:
                break
            await asyncio.sleep(0.01)
        assert fatal and "broker gone" in repr(fatal[0])
        assert p.committable() == {}
    finally:
        await p.stop()


async def test_feed_waits_while_max_in_flight_messages_are_unacknowledged() -> None:
    sink = ListSink(hold=True, batch_size=1000)
    p = build(sink, max_in_flight=4)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, b"{bad") for i in range(3)]})
        blocked = asyncio.create_task(p.feed("in", {0: [Rec(i, b"{bad") for i in range(3, 5)]}))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        assert p.in_flight == 3
        for fut in sink.pending:
            fut.set_result(None)
        await asyncio.wait_for(blocked, 2)
        assert p.in_flight == 2
    finally:
        for fut in sink.pending:
            if not fut.done():
                fut.set_result(None)
        await p.stop()


async def test_a_lone_message_does_not_wait_for_max_wait_when_the_engine_is_idle() -> None:
    sink = ListSink()
    p = build(sink, max_wait_s=30.0)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "hello there"))]})
        assert await p.drain(2.0), "a lone message waited for the age limit"
    finally:
        await p.stop()


async def test_under_a_backlog_batches_fill_to_their_cap() -> None:
    sink = ListSink()
    engine = FakeEngine(delay_s=0.02)
    p = build(sink, engine=engine, l1=False, max_wait_s=30.0, max_batch_size=8)
    await _drive(p, [{0: [Rec(i, raw(i, f"distinct text {i}")) for i in range(64)]}])
    # the first batch starts alone while the chunk is still being added; the rest are full
    assert engine.calls[1:] == [8] * ((64 - engine.calls[0]) // 8)


async def test_an_offset_reset_below_the_committed_offset_is_processed_and_counted() -> None:
    sink = ListSink()
    metrics = Metrics()
    p = build(sink, metrics=metrics)
    p.assigned({0: 50})
    await _drive(p, [{0: [Rec(o, raw(o, f"t {o}")) for o in range(5, 12)]}])
    assert [o for _, o in _sources(sink.docs("events"))] == list(range(5, 12))
    assert p.committable() == {0: 12}
    assert metrics.offset_resets_total.labels("0")._value.get() == 1


async def test_offsets_delivered_again_within_an_assignment_are_taken_once() -> None:
    """Faust resumes partitions before it seeks them to the committed offset, so what was fetched in between
    comes again: those records are in flight or acknowledged already, and must not be emitted twice."""
    sink = ListSink()
    metrics = Metrics()
    p = build(sink, metrics=metrics)
    p.assigned({0: None})
    chunks = [
        {0: [Rec(o, raw(o, f"t {o}")) for o in range(0, 6)]},
        {0: [Rec(o, raw(o, f"t {o}")) for o in range(0, 4)]},  # wholly taken already
        {0: [Rec(o, raw(o, f"t {o}")) for o in range(3, 8)]},  # partly
        {0: [Rec(o, raw(o, f"t {o}")) for o in range(8, 10)]},
    ]
    await _drive(p, chunks)
    assert [o for _, o in _sources(sink.docs("events"))] == list(range(10))
    assert p.committable() == {0: 10}
    assert p.in_flight == 0
    assert metrics.offset_resets_total.labels("0")._value.get() == 0


async def test_revocation_returns_what_to_commit_and_abandons_the_rest() -> None:
    sink = ListSink()
    engine = FakeEngine(delay_s=0.3)
    p = build(sink, engine=engine)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, b"{bad"), Rec(1, raw(1, "slow one"))], 1: [Rec(0, b"{bad")]})
        final = await p.revoke([0], timeout_s=0.1)
        assert final == {0: 1}  # the bad record is done; the slow one is abandoned uncommitted
        assert 0 not in p.committable()
        assert await p.drain(3)
        assert p.committable() == {1: 1}
    finally:
        await p.stop()


async def test_a_record_in_flight_at_repeated_crashes_is_isolated_then_dead_lettered(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.json"
    # the previous process died with offsets 1 and 2 of partition 0 in native code, twice for offset 2
    ledger_path.write_text(json.dumps({"in_flight": [["in", 0, 1, 2]], "strikes": [["in", 0, 2, 2]]}))
    ledger = CrashLedger(ledger_path, max_strikes=3)
    assert ledger.strikes(("in", 0, 1)) == 1 and ledger.is_poison(("in", 0, 2))
    sink = ListSink()
    engine = FakeEngine()
    p = build(sink, engine=engine, ledger=ledger, l1=False)
    await _drive(p, [{0: [Rec(o, raw(o, f"text {o}")) for o in range(4)]}])
    (dead,) = sink.docs("dlq")
    assert (dead["reason"], dead["source"]["offset"]) == ("crash_loop", 2)
    assert sorted(o for _, o in _sources(sink.docs("events"))) == [0, 1, 3]
    assert 1 in engine.calls  # the suspect ran alone
    state = json.loads(ledger_path.read_text())
    assert state == {"in_flight": [], "strikes": []}  # the suspect cleared its strike, the poison was forgotten


async def test_a_process_dying_in_native_code_leaves_its_records_in_the_ledger(tmp_path: Path) -> None:
    ledger = CrashLedger(tmp_path / "ledger.json")
    token = ledger.begin([("in", 3, 7), ("in", 3, 8)])
    # no end(): the process "died"; a new process reads the file
    again = CrashLedger(tmp_path / "ledger.json")
    assert again.strikes(("in", 3, 7)) == 1 and again.strikes(("in", 3, 8)) == 1
    del token


async def test_an_engine_failing_every_message_is_fatal() -> None:
    class Broken(FakeEngine):
        def predict(self, batch: Any) -> Any:
            raise RuntimeError("device lost")

    sink = ListSink()
    fatal: list[BaseException] = []
    p = build(sink, engine=Broken(), fatal=fatal, l1=False, max_consecutive_failures=3)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"text {i}")) for i in range(6)]})
        for _ in range(300):
            if fatal:
                break
            await asyncio.sleep(0.01)
        assert fatal and "engine unusable" in str(fatal[0])
    finally:
        await p.stop()
    assert len(sink.docs("dlq")) == 2  # the first failures look like poison; the third in a row is the engine


async def test_encoder_and_engine_calls_are_per_chunk_and_batch_not_per_message() -> None:
    sink = ListSink()
    encoder = FakeEncoder()
    engine = FakeEngine()
    p = build(sink, engine=engine, encoder=encoder, l1=False, max_batch_size=64)
    await _drive(
        p, [{0: [Rec(i, raw(i, f"text {i}")) for i in range(50)], 1: [Rec(i, raw(i, f"other {i}")) for i in range(50)]}]
    )
    assert encoder.calls == [100]
    assert len(engine.calls) <= 3


async def test_a_truncated_result_in_the_cache_is_still_rejected_when_overlong_texts_are() -> None:
    """A shared L2 can hold a result that another worker (or this one, before a settings change) computed by
    truncating the text; with overlong_reject the text is a dead letter all the same, not an event."""
    long_text = "word " * 30  # over the fake encoder's 16 tokens
    l2 = DictL2()
    sink = ListSink()
    await _drive(build(sink, l2=l2, l1=False), [{0: [Rec(0, raw(0, long_text))]}])
    (event,) = sink.docs("events")
    assert event["truncated"] is True and l2.data  # computed by truncating, and cached
    for l1 in (False, True):
        sink2, engine2 = ListSink(), FakeEngine()
        await _drive(
            build(sink2, l2=l2, l1=l1, engine=engine2, overlong_reject=True), [{0: [Rec(1, raw(1, long_text))]}]
        )
        assert sink2.docs("events") == []
        (dead,) = sink2.docs("dlq")
        assert (dead["reason"], dead["stage"]) == ("text_too_long", "tokenize")
        assert engine2.calls == []
