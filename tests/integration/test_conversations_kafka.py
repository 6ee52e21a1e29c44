"""Conversation state over the real broker: one alert per episode, survival of a SIGKILL, the read API
with forwarding between two workers, late messages, and expiry."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
import pytest
from aiokafka.partitioner import murmur2

from tests.integration.conftest import Topics, make_topics
from tests.integration.helpers import collect, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# texts the model labels with a wide margin (see test_pipeline_kafka.UNAMBIGUOUS)
JOY = "I am so happy and grateful, this is wonderful!"
FEAR = "I'm terrified, I'm so scared of what will happen"
SAD = "My best friend died today and I can't stop crying"

RULES = """
version = 1
[[rule]]
name = "distress-run"
kind = "consecutive"
severity = "critical"
description = "3 consecutive messages labelled sadness or fear."
labels = ["sadness", "fear"]
count = 3
rearm_after_messages = 3
"""

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def _msg(i: int, conv: str, text: str, sent_at: datetime) -> tuple[bytes, bytes]:
    doc = {
        "message_id": f"{conv}-m{i}",
        "conversation_id": conv,
        "user_id": "u-1",
        "text": text,
        "sent_at": sent_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return conv.encode(), orjson.dumps(doc)


def _script(conv: str, texts: list[str], start: int = 0, step_s: float = 10.0) -> list[tuple[bytes, bytes]]:
    return [_msg(start + i, conv, t, T0 + timedelta(seconds=(start + i) * step_s)) for i, t in enumerate(texts)]


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


def _env(rules_file: Path, **extra: str) -> dict[str, str]:
    return {
        "EMOTION_STREAM_CONVERSATIONS__RULES_FILE": str(rules_file),
        "EMOTION_STREAM_CONVERSATIONS__EMIT_INTERVAL_S": "0",
        "EMOTION_STREAM_CACHE__L2_ENABLED": "false",
        **extra,
    }


def _alerts(bootstrap: str, topics: Topics, want: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Alerts read until ``want`` arrived; with ``want=0``, every alert there is (read for 5 s)."""
    if want == 0:
        return [r.json() for r in collect(bootstrap, [topics.alerts], lambda r: False, timeout_s=5)]
    seen: list[dict[str, Any]] = []

    def done(rec: Any) -> bool:
        seen.append(rec.json())
        return len(seen) >= want

    collect(bootstrap, [topics.alerts], done, timeout_s=timeout_s)
    return seen


def _events(bootstrap: str, topics: Topics, n: int, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}

    def done(rec: Any) -> bool:
        doc = rec.json()
        seen[str(doc["message_id"])] = doc
        return len(seen) >= n

    collect(bootstrap, [topics.events], done, timeout_s=timeout_s)
    return list(seen.values())


def _get(port: int, conv: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/conversations/{conv}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def _wait_state(port: int, conv: str, count: int, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        last = _get(port, conv)
        if last[0] == 200 and last[1]["message_count"] >= count:
            return last[1]
        time.sleep(0.5)
    raise AssertionError(f"state of {conv} never reached {count} messages: {last}")


def test_an_escalating_conversation_fires_once_per_episode_at_the_right_message(
    kafka: Any, spawn_worker: Any, rules_file: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    worker = spawn_worker(topics, **_env(rules_file))
    worker.wait_ready()
    labels = [JOY, SAD, FEAR, JOY, SAD, FEAR, SAD, SAD, FEAR, JOY, JOY, JOY, FEAR, SAD, FEAR]
    # episode 1 fires at m6 (the third of SAD, FEAR, SAD); m7, m8 keep it open; three JOY re-arm it;
    # episode 2 fires at m14 (the third of FEAR, SAD, FEAR)
    produce(kafka.bootstrap_servers, topics.input, _script("conv-esc", labels))
    events = _events(kafka.bootstrap_servers, topics, len(labels))
    by_id = {e["message_id"]: e["label"] for e in events}
    assert [by_id[f"conv-esc-m{i}"] for i in range(len(labels))] == [
        {JOY: "joy", SAD: "sadness", FEAR: "fear"}[t] for t in labels
    ]
    _alerts(kafka.bootstrap_servers, topics, 2)
    alerts = _alerts(kafka.bootstrap_servers, topics, 0)
    assert [(a["episode"], a["triggered_by"]["message_id"]) for a in alerts] == [
        (1, "conv-esc-m6"),
        (2, "conv-esc-m14"),
    ], alerts
    assert all(a["rule"]["name"] == "distress-run" for a in alerts)
    state = _wait_state(worker.metrics_port, "conv-esc", len(labels))
    assert state["conversation_id"] == "conv-esc"
    states = collect(kafka.bootstrap_servers, [topics.conversations], lambda r: False, timeout_s=5)
    assert states and all(r.key == b"conv-esc" for r in states)


def test_state_survives_a_sigkill_and_the_alert_is_neither_lost_nor_repeated(
    kafka: Any, spawn_worker: Any, rules_file: Path, tmp_path: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    state_dir = tmp_path / "state-kill"
    first = spawn_worker(topics, name="victim", state_dir=state_dir, **_env(rules_file))
    first.wait_ready()
    head = [JOY, SAD, FEAR]  # two of the three distress messages
    produce(kafka.bootstrap_servers, topics.input, _script("conv-kill", head))
    _wait_state(first.metrics_port, "conv-kill", len(head))
    time.sleep(2.5)  # past a commit interval: the offsets of the head are committed
    first.kill()
    # a fresh worker (its own, empty state folder: the state must come from the changelog)
    second = spawn_worker(topics, name="survivor", **_env(rules_file))
    second.wait_ready()
    tail = [SAD, SAD, JOY]  # the first SAD completes the run: one alert, triggered by m3
    produce(kafka.bootstrap_servers, topics.input, _script("conv-kill", tail, start=len(head)))
    state = _wait_state(second.metrics_port, "conv-kill", len(head) + len(tail))
    assert state["message_count"] == len(head) + len(tail)
    _alerts(kafka.bootstrap_servers, topics, 1)
    alerts = _alerts(kafka.bootstrap_servers, topics, 0)
    assert {a["alert_id"] for a in alerts} and len({a["alert_id"] for a in alerts}) == 1, alerts
    assert {a["triggered_by"]["message_id"] for a in alerts} == {"conv-kill-m3"}


def test_the_read_api_answers_on_every_worker_and_state_follows_its_partition(
    kafka: Any, spawn_worker: Any, rules_file: Path
) -> None:
    topics = make_topics(kafka, partitions=4)
    a = spawn_worker(topics, name="a", **_env(rules_file))
    a.wait_ready()
    convs = [f"conv-{i}" for i in range(8)]
    produce(kafka.bootstrap_servers, topics.input, [m for c in convs for m in _script(c, [JOY, SAD])])
    for c in convs:
        _wait_state(a.metrics_port, c, 2)
    b = spawn_worker(topics, name="b", **_env(rules_file))
    b.wait_ready(timeout_s=120)
    time.sleep(3)  # the rebalance settles; each worker holds some partitions
    produce(kafka.bootstrap_servers, topics.input, [m for c in convs for m in _script(c, [FEAR], start=2)])
    for c in convs:
        for worker in (a, b):  # the worker not holding it forwards to the one that does
            state = _wait_state(worker.metrics_port, c, 3)
            assert state["message_count"] == 3, (c, worker.env["EMOTION_STREAM_WORKER__WORKER_ID"], state)
    status, body = _get(a.metrics_port, "conv-never-seen")
    assert status == 404, body


def test_the_read_api_finds_conversations_another_partitioner_placed_and_ids_with_url_characters(
    kafka: Any, spawn_worker: Any, rules_file: Path
) -> None:
    """librdkafka's default partitioner (``consistent_random``: CRC32 of the key, as kcat and confluent-kafka
    use) puts most conversations elsewhere than murmur2 would; ids may hold ``/``, ``?``, ``#``, ``%``."""
    topics = make_topics(kafka, partitions=4)
    a = spawn_worker(topics, name="a", **_env(rules_file))
    b = spawn_worker(topics, name="b", **_env(rules_file))
    a.wait_ready()
    b.wait_ready(timeout_s=120)
    time.sleep(3)  # the rebalance settles; each worker holds some partitions
    convs = [f"room/{i}?lang=de#top %2F..\\ ü" for i in range(12)]
    elsewhere = [c for c in convs if zlib.crc32(c.encode()) % 4 != (murmur2(c.encode()) & 0x7FFFFFFF) % 4]
    assert len(elsewhere) >= 6  # the case this test is about
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": kafka.bootstrap_servers, "partitioner": "consistent_random"}
    )
    for key, value in (m for c in convs for m in _script(c, [JOY, SAD])):
        producer.produce(topics.input, key=key, value=value)
    assert producer.flush(30) == 0
    for c in convs:
        for worker in (a, b):
            state = _wait_state(worker.metrics_port, urllib.parse.quote(c, safe=""), 2)
            assert state["conversation_id"] == c and state["message_count"] == 2, (c, state)
    for worker in (a, b):
        status, body = _get(worker.metrics_port, urllib.parse.quote("room/never?seen", safe=""))
        assert status == 404, body


def test_late_messages_within_the_allowance_count_and_beyond_it_are_ignored(
    kafka: Any, spawn_worker: Any, rules_file: Path
) -> None:
    topics = make_topics(kafka, partitions=1)
    worker = spawn_worker(topics, **_env(rules_file, EMOTION_STREAM_CONVERSATIONS__ALLOWED_LATENESS_S="60"))
    worker.wait_ready()
    now = T0 + timedelta(minutes=10)
    records = [
        _msg(0, "conv-late", JOY, now),
        _msg(1, "conv-late", JOY, now + timedelta(seconds=30)),
        _msg(2, "conv-late", SAD, now - timedelta(seconds=20)),  # 50 s behind the latest: within 60 s
        _msg(3, "conv-late", SAD, now - timedelta(seconds=300)),  # 330 s behind: beyond, ignored
    ]
    produce(kafka.bootstrap_servers, topics.input, records)
    state = _wait_state(worker.metrics_port, "conv-late", 3)
    time.sleep(2)
    _, state = _get(worker.metrics_port, "conv-late")
    assert state["message_count"] == 3
    assert state["counters"]["late_ignored"] == 1
    assert state["window"]["message_count"] == 3


def test_a_hundred_thousand_conversations_expire_back_to_an_empty_table(
    kafka: Any, spawn_worker: Any, rules_file: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    n = 100_000  # one text: after the first, every message is an L1 hit, so this runs at the host's pace
    worker = spawn_worker(
        topics,
        **_env(
            rules_file,
            EMOTION_STREAM_CONVERSATIONS__TTL_S="5",
            EMOTION_STREAM_CONVERSATIONS__SWEEP_INTERVAL_S="2",
        ),
    )
    worker.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, [_msg(i, f"conv-x{i}", JOY, T0) for i in range(n)])
    _events(kafka.bootstrap_servers, topics, n, timeout_s=300)
    deadline = time.monotonic() + 90
    active = None
    while time.monotonic() < deadline:
        for line in worker.scrape().splitlines():
            if line.startswith("emotion_conversations_active "):
                active = float(line.split()[1])
        if active == 0:
            break
        time.sleep(1)
    assert active == 0, worker.log_tail()
    status, _ = _get(worker.metrics_port, "conv-x7")
    assert status == 404
