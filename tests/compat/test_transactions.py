"""Transactional producers: committed records are classified after the commit, aborted ones never.

Issue 10, item 4: the worker read uncommitted, so records a producer rolled back got events. Here a
confluent-kafka (librdkafka) transactional producer leaves a transaction open for a few seconds (no output
may appear meanwhile), commits it (all must appear), then aborts one (nothing may ever appear for it, not
even a dead letter for its malformed record), and an aiokafka transactional producer aborts one too.
Records committed after the aborted ones, on the same partitions, prove the worker read past them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from stream_app.devtools.kafka_local import LocalKafka
from stream_app.kafka_config import aiokafka_client_kwargs, librdkafka_config
from stream_app.settings import KafkaSettings
from tests.compat.conftest import ClosingTable, CompatTopics, Spawn, create_topics
from tests.compat.helpers import (
    Coord,
    Msg,
    OutputWatcher,
    account,
    chat,
    malformed,
    missing_report,
    produce_aiokafka,
    produce_confluent,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
OPEN_S = 4.0
WAIT_S = 90.0


def _msgs(prefix: str, texts: list[str], n: int, *, bad: int = 0) -> list[Msg]:
    good = [chat(f"{prefix}-{i}", texts[i % len(texts)], conversation=f"{prefix}-c{i % 4}", partition=i % PARTITIONS)
            for i in range(n)]  # fmt: skip
    return good + [malformed(f"{prefix}-bad-{i}", partition=i % PARTITIONS) for i in range(bad)]


def _transactional_producer(settings: KafkaSettings) -> Any:
    from confluent_kafka import Producer

    producer = Producer({**librdkafka_config(settings, client_id="compat-txn"), "transactional.id":
                         f"compat-txn-{uuid.uuid4().hex[:8]}", "linger.ms": 5})  # fmt: skip
    producer.init_transactions(30)
    return producer


def _aiokafka_aborted(settings: KafkaSettings, topic: str, msgs: list[Msg]) -> dict[Coord, Msg]:
    async def run() -> dict[Coord, Msg]:
        producer = AIOKafkaProducer(
            **aiokafka_client_kwargs(settings, client_id="compat-aio-txn"),
            transactional_id=f"compat-aio-txn-{uuid.uuid4().hex[:8]}",
            enable_idempotence=True,
        )
        await producer.start()
        placed: dict[Coord, Msg] = {}
        try:
            await producer.begin_transaction()
            for m in msgs:
                meta = await producer.send_and_wait(topic, m.value, key=m.key, partition=m.partition)
                placed[(meta.topic, meta.partition, meta.offset)] = m
            await producer.abort_transaction()
        finally:
            await producer.stop()
        return placed

    return asyncio.run(run())


def test_transactions_committed_after_commit_aborted_never(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, data_dir: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("txn")
    create_topics(settings, topics, PARTITIONS)
    worker = spawn(settings, topics)
    texts = dev_texts(data_dir, 80)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        # the worker is reading: plain records before anything else
        warm = produce_confluent(settings, topics.input, _msgs("warm", texts, 4))
        assert watcher.wait_for(warm, WAIT_S) >= 0, worker.log_tail()

        # 1. an open transaction is not read ahead of its outcome
        txn = _transactional_producer(settings)
        txn.begin_transaction()
        committed = produce_confluent(settings, topics.input, _msgs("txn-commit", texts[4:], 12, bad=2),
                                      producer=txn)  # fmt: skip
        opened = time.monotonic()
        time.sleep(OPEN_S)
        early = watcher.outputs_for(committed)
        open_for = time.monotonic() - opened
        txn.commit_transaction(30)
        appeared_in = watcher.wait_for(committed, WAIT_S)
        commit_row = closing_table.add(account(
            f"transaction committed (open {open_for:.0f} s: {len(early)} early outputs)", committed, watcher,
            worker.restarts,
        ))  # fmt: skip

        # 2. aborted transactions: librdkafka, then aiokafka; then committed records behind them
        txn.begin_transaction()
        aborted = produce_confluent(settings, topics.input, _msgs("txn-abort", texts[20:], 12, bad=2),
                                    producer=txn)  # fmt: skip
        txn.abort_transaction(30)
        aborted |= _aiokafka_aborted(settings, topics.input, _msgs("aio-abort", texts[40:], 6, bad=1))
        txn.begin_transaction()
        after = produce_confluent(settings, topics.input, _msgs("txn-after", texts[50:], 8, bad=1), producer=txn)
        txn.commit_transaction(30)
        after |= produce_aiokafka(settings, topics.input, _msgs("plain-after", texts[60:], 4))
        after_waited = watcher.wait_for(after, WAIT_S)
        time.sleep(2.0)  # anything the aborted records would have produced has had its chance
        leaked = watcher.outputs_for(aborted)
        abort_row = closing_table.add(account(
            f"transaction aborted ({len(aborted)} aborted records: {len(leaked)} with outputs)", after, watcher,
            worker.restarts,
        ))  # fmt: skip
        txn.flush(10)

    assert not early, f"outputs for an open transaction's records: {sorted(early)[:5]}"
    assert open_for >= OPEN_S
    assert appeared_in >= 0, f"{missing_report(committed, watcher)}\n{worker.log_tail()}"
    assert commit_row.ok, (commit_row, worker.exit_codes, worker.log_tail())
    assert commit_row.dead_letters == 2
    assert after_waited >= 0, f"{missing_report(after, watcher)}\n{worker.log_tail()}"
    assert not leaked, f"outputs for aborted records: {sorted(leaked)[:5]}"
    assert abort_row.ok, (abort_row, worker.exit_codes, worker.log_tail())
    # the records after the aborted ones share their partitions: the worker read past them
    assert {c[1] for c in aborted} == {c[1] for c in after} == set(range(PARTITIONS))
    assert min(c[2] for c in after if c[1] == 0) > max(c[2] for c in aborted if c[1] == 0)
    assert worker.alive, worker.log_tail()
