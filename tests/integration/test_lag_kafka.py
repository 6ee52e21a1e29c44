"""Consumer lag over a real broker, fed by a transactional librdkafka producer (as a Java or Go chat
service with exactly-once output would feed it).

A committed transaction ends with a marker record in each partition it wrote: the log end is one past the
marker, and the last message is one before it. A lag computed as "log end - committed offset" stays at 1
forever; the worker's gauges count only records still to process (up to the last stable offset, markers
and aborted records excluded), in messages and in seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from stream_app.devtools.clients import chat_message
from tests.integration.conftest import make_topics
from tests.integration.helpers import Until, collect, dev_texts
from tests.integration.worker_http import by_partition, samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

confluent_kafka = pytest.importorskip("confluent_kafka")

LAG = "emotion_consumer_lag_messages"
LAG_S = "emotion_consumer_lag_seconds"


def produce_in_transactions(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes, bytes]],
    *,
    per_transaction: int,
    abort: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Produce ``records`` in committed transactions of ``per_transaction``; ``abort`` goes into one
    aborted transaction in the middle (read_committed consumers never see it)."""
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"chat-service-{uuid.uuid4().hex[:8]}",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    producer.init_transactions(30)
    chunks = [records[i : i + per_transaction] for i in range(0, len(records), per_transaction)]
    for n, chunk in enumerate(chunks):
        if abort and n == len(chunks) // 2:
            producer.begin_transaction()
            for key, value in abort:
                producer.produce(topic, value=value, key=key)
            producer.abort_transaction(30)
        producer.begin_transaction()
        for key, value in chunk:
            producer.produce(topic, value=value, key=key)
        producer.commit_transaction(30)


def _messages(texts: Sequence[str], prefix: str) -> list[tuple[bytes, bytes]]:
    return [chat_message(f"{prefix}-{i}", f"c-{i % 23}", text) for i, text in enumerate(texts)]


def _end_and_committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, tuple[int, int]]:
    """``{partition: (log end offset, the group's committed offset)}`` as the broker has them."""

    async def read() -> dict[int, tuple[int, int]]:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await consumer.start()
        await admin.start()
        try:
            ends = await consumer.end_offsets(tps)
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        finally:
            await consumer.stop()
            await admin.close()
        return {tp.partition: (ends[tp], committed[tp].offset if tp in committed else -1) for tp in tps}

    return asyncio.run(read())


def _lags(port: int) -> tuple[dict[int, float], dict[int, float]]:
    values = samples(port)
    return by_partition(values, LAG), by_partition(values, LAG_S)


def _wait_lag_zero(port: int, partitions: int, timeout_s: float = 30.0) -> float:
    """Seconds until every partition's lag is 0 (messages and seconds) on three scrapes in a row."""
    start = time.monotonic()
    zero_in_a_row = 0
    last: Any = None
    while time.monotonic() - start < timeout_s:
        messages, seconds = last = _lags(port)
        if set(messages) == set(range(partitions)) and not any(messages.values()) and not any(seconds.values()):
            zero_in_a_row += 1
            if zero_in_a_row == 3:
                return time.monotonic() - start
        else:
            zero_in_a_row = 0
        time.sleep(0.6)
    raise AssertionError(f"lag not 0 on every partition after {timeout_s:.0f} s: {last}")


def test_committed_transactions_leave_no_lag_not_even_their_markers(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    worker = spawn_worker(topics)
    worker.wait_ready()
    texts = dev_texts(data_dir, 230)
    records = _messages(texts[:200], "m")
    aborted = _messages(texts[200:], "aborted")
    produce_in_transactions(kafka.bootstrap_servers, topics.input, records, per_transaction=40, abort=aborted)
    got = collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: 200}, distinct_ids=True), 120)
    ids = {str(r.json()["message_id"]) for r in got}
    assert len(ids) == 200 and not any(i.startswith("aborted") for i in ids)
    _wait_lag_zero(worker.metrics_port, partitions=2)
    assert samples(worker.metrics_port)[("emotion_messages_total", ())] == 200
    # what a naive lag would read: every partition's log ends one past its last message (the marker)
    group = worker.env["EMOTION_STREAM_WORKER__APP_ID"]
    deadline = time.monotonic() + 30
    while True:
        offsets = _end_and_committed(kafka.bootstrap_servers, topics.input, group, 2)
        if all(end - committed == 1 for end, committed in offsets.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(end - committed == 1 for end, committed in offsets.values()), offsets
    assert not any(_lags(worker.metrics_port)[0].values())


def test_lag_rises_while_the_worker_is_stopped_and_returns_to_zero(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    # SIGSTOP freezes the heartbeat too: a session longer than the pause keeps the partitions here
    worker = spawn_worker(topics, EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S="45")
    worker.wait_ready()
    port = worker.metrics_port
    texts = dev_texts(data_dir, 1640)
    produce_in_transactions(kafka.bootstrap_servers, topics.input, _messages(texts[:40], "warm"), per_transaction=20)
    collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: 40}, distinct_ids=True), 120)
    _wait_lag_zero(port, partitions=2)

    pause_s = 6.0
    os.kill(worker.process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        backlog = _messages(texts[40:], "backlog")
        produce_in_transactions(kafka.bootstrap_servers, topics.input, backlog, per_transaction=200)
        time.sleep(max(0.0, pause_s - (time.monotonic() - stopped)))
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    peak_messages = 0.0
    peak_seconds = 0.0
    peak_in_flight = 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        values = samples(port)
        messages, seconds = by_partition(values, LAG), by_partition(values, LAG_S)
        peak_messages = max(peak_messages, sum(messages.values()))
        peak_seconds = max(peak_seconds, max(seconds.values(), default=0.0))
        peak_in_flight = max(peak_in_flight, values[("emotion_in_flight_messages", ())])
        if peak_messages and not any(messages.values()) and not any(seconds.values()):
            break
        time.sleep(0.2)
    assert peak_messages >= 100, f"lag in messages peaked at {peak_messages} with {len(backlog)} waiting"
    # the oldest waiting record was produced right after the pause began and waited out the pause
    assert peak_seconds >= pause_s / 2, f"lag in seconds peaked at {peak_seconds:.1f} s"
    assert peak_in_flight > 0, "the in-flight gauge never moved"  # the dashboard and the stuck alert read it
    _wait_lag_zero(port, partitions=2, timeout_s=60)
    assert samples(port)[("emotion_in_flight_messages", ())] == 0
    got = collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: 1640}, distinct_ids=True), 120)
    assert len({str(r.json()["message_id"]) for r in got}) == 1640
