"""A committed offset beyond the log end (after a truncation, a restore or a mistaken reset).

Issue 10, item 3: the consumer reset to the log start, but the worker dropped every record below the old
committed offset without a trace. Here the worker commits offset 5 on each partition and is stopped;
confluent-kafka's AdminClient sets the group's offsets beyond the log end (50 and 40); more records are
produced (the log end stays below those offsets); the worker starts again. Every record must be processed
(re-processing 0..4 is allowed, skipping is not), a WARNING must name the partition and both offsets,
``emotion_offset_resets_total`` must count it, and records produced later, past the old offsets, must be
processed and committed too. In both delivery modes: under exactly-once the first chunk could come before
Faust's seek had read the committed offset, and the reset went uncounted and unwarned (found by a new user).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka
from stream_app.settings import KafkaSettings
from tests.compat.conftest import ClosingTable, CompatTopics, Spawn, create_topics
from tests.compat.helpers import (
    Coord,
    Msg,
    OutputWatcher,
    account,
    chat,
    confluent_admin,
    malformed,
    missing_report,
    produce_confluent,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 120.0
BEYOND = {0: 50, 1: 40}


def _msgs(prefix: str, texts: list[str], partition: int, start: int, n: int) -> list[Msg]:
    out = [chat(f"{prefix}-p{partition}-{i}", texts[i % len(texts)], conversation=f"{prefix}-{partition}",
                partition=partition) for i in range(start, start + n)]  # fmt: skip
    out[-1] = malformed(f"{prefix}-p{partition}-bad", partition=partition)  # one dead letter in each lot
    return out


def _committed(settings: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    admin = confluent_admin(settings)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in BEYOND])
    result = admin.list_consumer_group_offsets([request])[group].result(30)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def _wait_committed(
    settings: KafkaSettings, group: str, topic: str, want: dict[int, int], timeout_s: float
) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = _committed(settings, group, topic)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def _set_offsets(settings: KafkaSettings, group: str, topic: str, offsets: dict[int, int]) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    admin = confluent_admin(settings)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
    deadline = time.monotonic() + 30
    while True:  # the group must be empty: the stopped worker's membership may take a moment to go
        try:
            admin.alter_consumer_group_offsets([request])[group].result(30)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_a_committed_offset_beyond_the_log_end(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, data_dir: Path, delivery: str
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("reset")
    create_topics(settings, topics, len(BEYOND))
    group = f"compat-reset-{int(time.time() * 1000) % 10**9}"
    worker = spawn(settings, topics, group_id=group, EMOTION_STREAM_WORKER__DELIVERY=delivery)
    texts = dev_texts(data_dir, 80)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        first: dict[Coord, Msg] = {}
        for p in BEYOND:
            first |= produce_confluent(settings, topics.input, _msgs("first", texts, p, 0, 5))
        assert watcher.wait_for(first, WAIT_S) >= 0, f"{missing_report(first, watcher)}\n{worker.log_tail()}"
        committed = _wait_committed(settings, group, topics.input, dict.fromkeys(BEYOND, 5), 30)
        assert committed == dict.fromkeys(BEYOND, 5), committed
        assert worker.stop() == 0, worker.log_tail()

        _set_offsets(settings, group, topics.input, BEYOND)
        assert _committed(settings, group, topics.input) == BEYOND
        second: dict[Coord, Msg] = {}
        for p in BEYOND:
            second |= produce_confluent(settings, topics.input, _msgs("second", texts, p, 5, 20))
        assert max(c[2] for c in second) + 1 < min(BEYOND.values())  # still beyond the log end
        worker.start()  # a deliberate start; the supervisor counts only the exits nobody asked for
        worker.wait_ready()
        second_waited = watcher.wait_for(second, WAIT_S)
        resets = {p: worker.metric("emotion_offset_resets", partition=str(p)) for p in BEYOND}
        warnings = {p: worker.log_lines(rf"WARNING.*partition {p}\b.*\b{o}\b.*\b0\b") for p, o in BEYOND.items()}

        # records past the old committed offsets: processed, and the committed offset follows
        third: dict[Coord, Msg] = {}
        third |= produce_confluent(settings, topics.input, _msgs("third", texts, 0, 25, 40))
        third |= produce_confluent(settings, topics.input, _msgs("third", texts, 1, 25, 10))
        third_waited = watcher.wait_for(third, WAIT_S)
        ends = {0: 65, 1: 35}
        committed_after = _wait_committed(settings, group, topics.input, ends, 30)
        everything = {**first, **second, **third}
        row = closing_table.add(account(
            "committed offset beyond the log end (5 -> 50 / 40, log end 25)", everything, watcher, worker.restarts
        ))  # fmt: skip
    assert second_waited >= 0, f"{missing_report(second, watcher)}\n{worker.log_tail()}"
    assert third_waited >= 0, f"{missing_report(third, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert all(resets[p] >= 1 for p in BEYOND), (resets, worker.log_tail())
    assert all(warnings.values()), (warnings, [ln for ln in worker.log_text().splitlines() if "WARNING" in ln])
    assert committed_after == ends
    assert worker.alive, worker.log_tail()
    assert not [ln for ln in worker.log_text().splitlines() if re.search(r"\b(ERROR|CRITICAL)\b.*stream_app", ln)]
