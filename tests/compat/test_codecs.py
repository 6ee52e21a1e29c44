"""Every Kafka codec, from librdkafka (confluent-kafka and kcat) and aiokafka, and a zstd topic.

Issue 10, item 1: one lz4, snappy or zstd record made by kcat stopped the worker for good. Here each codec
comes from three producers into one input topic (valid messages and one malformed record per producer and
codec), and a second worker reads a topic whose ``compression.type=zstd`` makes the broker recompress
whatever it is sent. The worker's own output is compressed too (``KAFKA__COMPRESSION_TYPE``), and read
back by a plain aiokafka consumer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka
from tests.compat.conftest import ClosingTable, CompatTopics, Spawn, create_topics
from tests.compat.helpers import (
    Coord,
    Msg,
    OutputWatcher,
    account,
    batch_codecs,
    chat,
    kcat_produce,
    locate,
    malformed,
    missing_report,
    produce_aiokafka,
    produce_confluent,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
PER_PRODUCER = 8
WAIT_S = 120.0


def _batch(prefix: str, texts: list[str], n: int, *, conversation: str, bad: bool = True) -> list[Msg]:
    msgs = [chat(f"{prefix}-{i}", texts[i % len(texts)], conversation=f"{conversation}-{i % 3}") for i in range(n)]
    return [*msgs, malformed(f"{prefix}-bad")] if bad else msgs


def test_every_codec_from_librdkafka_kcat_and_aiokafka(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, kcat: str, data_dir: Path, tmp_path: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("codecs")
    create_topics(settings, topics, 4)
    worker = spawn(settings, topics, EMOTION_STREAM_KAFKA__COMPRESSION_TYPE="lz4")
    texts = dev_texts(data_dir, 120)
    expected: dict[str, dict[Coord, Msg]] = {}
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        for n, codec in enumerate(CODECS):
            mine = texts[n * 20 : n * 20 + 20]
            placed = produce_confluent(
                settings, topics.input, _batch(f"{codec}-librdkafka", mine, PER_PRODUCER, conversation="lib"),
                compression=codec,
            )  # fmt: skip
            placed |= produce_aiokafka(
                settings, topics.input, _batch(f"{codec}-aiokafka", mine, PER_PRODUCER, conversation="aio"),
                compression=None if codec == "none" else codec,
            )  # fmt: skip
            # as in the issue: kcat -P -b <bootstrap> -t <input> -k conv-1 -z <codec> message.json ...
            by_kcat = _batch(f"{codec}-kcat", mine, 4, conversation="conv", bad=False)
            by_kcat = [Msg(b"conv-1", m.value, m.expect, m.message_id) for m in by_kcat]
            kcat_produce(settings, topics.input, by_kcat, tmp_path / f"kcat-{codec}", compression=codec)
            kcat_bad = [malformed(f"{codec}-kcat-bad")]
            kcat_produce(settings, topics.input, kcat_bad, tmp_path / f"kcat-{codec}-bad", compression=codec)
            placed |= locate(settings, topics.input, [*by_kcat, *kcat_bad])
            expected[codec] = placed

        everything = {c: m for placed in expected.values() for c, m in placed.items()}
        waited = watcher.wait_for(everything, WAIT_S)
        rows = [
            closing_table.add(
                account(f"codec {codec} (confluent-kafka, aiokafka, kcat)", placed, watcher, worker.restarts)
            )
            for codec, placed in expected.items()
        ]
    assert waited >= 0, f"{missing_report(everything, watcher)}\n{worker.log_tail()}"
    for row in rows:
        assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert worker.alive, worker.log_tail()
    # every malformed record is a dead letter of its own, whatever its batch's codec
    assert sum(r.dead_letters for r in rows) == len(CODECS) * 3
    # the conditions were real: the broker holds batches in every codec, and the worker's in lz4
    assert set(batch_codecs(kafka.run_dir / "data", topics.input)) == set(CODECS)
    assert set(batch_codecs(kafka.run_dir / "data", topics.events)) == {"lz4"}


def test_a_topic_with_compression_type_zstd(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, kcat: str, data_dir: Path, tmp_path: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("zstdtopic")
    # the broker recompresses every batch to zstd, whatever the producer sent
    create_topics(settings, topics, 3, input_config={"compression.type": "zstd"})
    worker = spawn(settings, topics, EMOTION_STREAM_KAFKA__COMPRESSION_TYPE="zstd")
    texts = dev_texts(data_dir, 40)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        placed = produce_confluent(settings, topics.input, _batch("zt-lib-none", texts, 10, conversation="a"))
        placed |= produce_confluent(
            settings, topics.input, _batch("zt-lib-gzip", texts[10:], 10, conversation="b"), compression="gzip"
        )
        placed |= produce_aiokafka(settings, topics.input, _batch("zt-aio", texts[20:], 10, conversation="c"))
        by_kcat = [Msg(b"conv-1", m.value, m.expect, m.message_id)
                   for m in _batch("zt-kcat", texts[30:], 4, conversation="d", bad=False)]  # fmt: skip
        kcat_produce(settings, topics.input, by_kcat, tmp_path / "kcat")
        placed |= locate(settings, topics.input, by_kcat)
        waited = watcher.wait_for(placed, WAIT_S)
        row = closing_table.add(account("input topic with compression.type=zstd", placed, watcher, worker.restarts))
    assert waited >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert row.dead_letters == 3
    assert set(batch_codecs(kafka.run_dir / "data", topics.input)) == {"zstd"}
    assert set(batch_codecs(kafka.run_dir / "data", topics.events)) == {"zstd"}
    assert worker.alive, worker.log_tail()
