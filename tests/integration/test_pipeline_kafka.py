"""End to end over a real Apache Kafka: events, dead letters, order, metrics, and a SIGKILL mid-stream."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_app.devtools.clients import chat_message
from tests.integration.conftest import make_topics
from tests.integration.helpers import Until, collect, dev_texts, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# texts this model labels with a wide margin (top two >= 0.24 apart in fp32 and INT8, at batch 1 and 6):
# INT8 scales activations per batch, so a near tie may flip with the batch a text lands in
UNAMBIGUOUS = {
    "I am so happy and grateful, this is wonderful!": "joy",
    "I am absolutely furious with you, this makes me so angry": "anger",
    "I'm terrified, I'm so scared of what will happen": "fear",
    "My best friend died today and I can't stop crying": "sadness",
    "This is disgusting and vile, I hate looking at it": "disgust",
    "Wow, I did not expect that at all, what a surprise!": "surprise",
}

GOOD = {"message_id": "x", "conversation_id": "c-bad", "user_id": "u", "sent_at": "2026-01-01T00:00:00Z"}
MALFORMED: list[tuple[bytes, str]] = [
    (b"{not json at all", "undecodable"),
    (b"\xff\xfe\xfa invalid utf-8", "undecodable"),
    (orjson.dumps({**GOOD, "text": "   \n\t "}), "empty_text"),
    (orjson.dumps({**GOOD, "text": ""}), "schema"),
    (orjson.dumps({k: v for k, v in GOOD.items() if k != "user_id"} | {"text": "hi"}), "schema"),
    (orjson.dumps({**GOOD, "text": 42}), "schema"),
    (orjson.dumps({**GOOD, "text": "x" * 600_000}), "too_large"),
    (b"[1, 2, 3]", "schema"),
    (orjson.dumps({**GOOD, "text": "hello", "sent_at": "not a time"}), "schema"),
    (orjson.dumps({**GOOD, "text": "long " * 400}), "text_too_long"),
]


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _metric(families: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for sample in families[name].samples:
        if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
            total += sample.value
    return total


def test_thousand_messages_fifty_malformed(kafka: Any, spawn_worker: Any, data_dir: Path) -> None:
    topics = make_topics(kafka, partitions=4)
    # reject over-long texts so the text_too_long reason is exercised; 2,000 chars allowed
    worker = spawn_worker(
        topics, EMOTION_STREAM_MODEL__OVERLONG="reject", EMOTION_STREAM_MODEL__MAX_LENGTH_TOKENS="128"
    )
    rng = random.Random(3)
    texts = dev_texts(data_dir, 1000 - len(UNAMBIGUOUS) * 5) + list(UNAMBIGUOUS) * 5
    rng.shuffle(texts)
    records: list[tuple[bytes | None, bytes | None]] = []
    expected_reason: dict[int, str] = {}
    good_ids: list[str] = []
    bad = [MALFORMED[i % len(MALFORMED)] for i in range(50)]
    bad_at = set(rng.sample(range(1050), 50))
    t_iter = iter(texts)
    b_iter = iter(bad)
    for pos in range(1050):
        if pos in bad_at:
            raw, reason = next(b_iter)
            records.append((b"c-bad", raw))
            expected_reason[pos] = reason
        else:
            i = len(good_ids)
            good_ids.append(f"m-{i}")
            records.append(chat_message(f"m-{i}", f"c-{i % 37}", next(t_iter), user_id=f"u-{i % 11}"))
    worker.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, records)

    done = Until({topics.events: 1000, topics.dead_letters: 50})
    got = collect(kafka.bootstrap_servers, [topics.events, topics.dead_letters], done, timeout_s=300)
    events = [r for r in got if r.topic == topics.events]
    dead = [r for r in got if r.topic == topics.dead_letters]
    assert len(events) == 1000, worker.log_tail()
    assert len(dead) == 50, worker.log_tail()

    ev_validator = _validator("emotion_event.v1")
    by_message: dict[str, dict[str, Any]] = {}
    for rec in events:
        doc = rec.json()
        ev_validator.validate(doc)
        assert rec.key == str(doc["conversation_id"]).encode()
        by_message[str(doc["message_id"])] = doc
    assert sorted(by_message) == sorted(good_ids)
    assert len({d["event_id"] for d in by_message.values()}) == 1000

    # the unambiguous texts get their label
    text_of = {f"m-{i}": t for i, t in enumerate(texts)}
    for mid, doc in by_message.items():
        want = UNAMBIGUOUS.get(text_of[mid])
        if want is not None:
            assert doc["label"] == want, (text_of[mid], doc["scores"])

    # per-conversation order: events of a conversation appear in the order of their source offsets
    per_conv: dict[str, list[int]] = defaultdict(list)
    for rec in sorted(events, key=lambda r: (r.partition, r.offset)):
        doc = rec.json()
        source = doc["source"]
        per_conv[str(doc["conversation_id"])].append(int(source["offset"]))
    for conv, offsets in per_conv.items():
        assert offsets == sorted(offsets), conv

    # dead letters: the right reason, the raw bytes, the source coordinates
    dl_validator = _validator("dead_letter.v1")
    reasons = sorted(str(r.json()["reason"]) for r in dead)
    for rec in dead:
        dl_validator.validate(rec.json())
    assert reasons == sorted(expected_reason.values())

    # stage metrics: one valid record per batch, sizes adding up to the inferred messages
    stage = collect(kafka.bootstrap_servers, [topics.metrics], lambda r: False, timeout_s=8)
    sm_validator = _validator("stage_metrics.v1")
    for rec in stage:
        sm_validator.validate(rec.json())
    inferred = sum(int(str(r.json()["size"])) for r in stage)
    batch_hits = sum(int(str(r.json()["cache"]["batch_hits"])) for r in stage)  # type: ignore[index]
    cache_levels = [d["cache"]["level"] for d in by_message.values()]
    assert inferred == cache_levels.count("none")
    assert batch_hits == cache_levels.count("batch")

    # prometheus: parses, and its counters match what was processed
    families = {f.name: f for f in text_string_to_metric_families(worker.scrape())}
    assert _metric(families, "emotion_events") == 1000
    assert _metric(families, "emotion_dead_letters") == 50
    assert _metric(families, "emotion_messages") == 1050
    for reason in set(expected_reason.values()):
        assert _metric(families, "emotion_dead_letters", reason=reason) == list(expected_reason.values()).count(reason)
    hits = sum(_metric(families, "emotion_cache_lookups", level=lvl, result="hit") for lvl in ("l1", "l2"))
    assert hits == cache_levels.count("l1") + cache_levels.count("l2")
    assert families["emotion_in_flight_messages"].samples[0].value == 0


def test_sigkill_mid_stream_loses_nothing(kafka: Any, spawn_worker: Any, data_dir: Path) -> None:
    topics = make_topics(kafka, partitions=4)
    texts = dev_texts(data_dir, 2000)
    records = [chat_message(f"m-{i}", f"c-{i % 53}", t) for i, t in enumerate(texts)]
    # no cache: every message is inferred, so the kill lands while batches are in flight
    cache_off = {"EMOTION_STREAM_CACHE__L1_ENABLED": "false", "EMOTION_STREAM_CACHE__L2_ENABLED": "false"}
    first = spawn_worker(topics, name="victim", **cache_off)
    first.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, records)
    partial = collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: 300}), timeout_s=180)
    assert len(partial) >= 300
    first.kill()
    before_restart = collect(kafka.bootstrap_servers, [topics.events], lambda r: False, timeout_s=5)
    # the test means something only if the kill left work undone
    assert len({str(r.json()["message_id"]) for r in before_restart}) < len(records), "kill landed too late"
    second = spawn_worker(topics, name="survivor", state_dir=None, **cache_off)
    second.wait_ready()
    wanted = {f"m-{i}" for i in range(len(records))}
    all_seen = Until({topics.events: len(records)}, distinct_ids=True)
    got = collect(kafka.bootstrap_servers, [topics.events], all_seen, timeout_s=300)
    ids = [str(r.json()["message_id"]) for r in got]
    missing = wanted - set(ids)
    assert not missing, f"{len(missing)} messages have no event:\n{second.log_tail()}"
    # duplicates are allowed, and recognisable: the same message always has the same event_id
    event_ids: dict[str, set[str]] = defaultdict(set)
    for r in got:
        doc = r.json()
        event_ids[str(doc["message_id"])].add(str(doc["event_id"]))
    assert all(len(v) == 1 for v in event_ids.values())
