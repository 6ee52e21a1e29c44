"""Produce records with headers and known coordinates; read the worker's outputs back by source coordinates.

Used by the robustness and fuzz integration tests: every produced record's ``(partition, offset)`` is
known from its acknowledgement, and every event or dead letter states the coordinates it was made from, so
"each input exactly one outcome" is checked record by record (:func:`tests.fuzzing.check_outputs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from tests.fuzzing import Output

Headers = Sequence[tuple[str, bytes | None]]
Coords = tuple[int, int]


@dataclass(frozen=True)
class ToSend:
    """One record to produce; ``partition`` None lets the default partitioner choose (by key)."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    partition: int | None = None


async def _produce(bootstrap: str, topic: str, records: Sequence[ToSend]) -> list[Coords]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers), partition=r.partition)
            for r in records
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


def produce(bootstrap: str, topic: str, records: Sequence[ToSend]) -> list[Coords]:
    """Produce ``records`` in order (acks=all); returns each one's ``(partition, offset)``."""
    return asyncio.run(_produce(bootstrap, topic, records))


@dataclass
class Outputs:
    """Events and dead letters read back, by the source coordinates they state."""

    by_source: dict[Coords, list[Output]] = field(default_factory=dict)
    records: int = 0

    def add(self, kind: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        doc = orjson.loads(value)
        src = doc["source"]
        coords = (int(src["partition"]), int(src["offset"]))
        self.by_source.setdefault(coords, []).append(Output(kind, key, value, list(headers)))
        self.records += 1

    def docs(self, coords: Coords) -> list[dict[str, Any]]:
        return [orjson.loads(o.value) for o in self.by_source.get(coords, [])]


def read_outputs(
    bootstrap: str,
    events_topic: str,
    dead_letters_topic: str,
    done: Callable[[Outputs], bool],
    *,
    timeout_s: float,
    settle_s: float = 3.0,
) -> Outputs:
    """Read both output topics from the start until ``done(outputs)`` holds (or ``timeout_s``), then
    ``settle_s`` more seconds, so duplicates and outputs for no input show up too."""

    async def run() -> Outputs:
        out = Outputs()
        consumer = AIOKafkaConsumer(
            events_topic,
            dead_letters_topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=1000,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + timeout_s
            settle_until: float | None = None
            while True:
                now = time.monotonic()
                if settle_until is None and (done(out) or now > deadline):
                    settle_until = now + settle_s
                if settle_until is not None and now > settle_until:
                    return out
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for tp, recs in batch.items():
                    kind = "event" if tp.topic == events_topic else "dead_letter"
                    for r in recs:
                        out.add(kind, r.key, r.value, r.headers)
        finally:
            await consumer.stop()

    return asyncio.run(run())


async def recreate_topic(
    bootstrap: str, name: str, partitions: int, configs: dict[str, str], timeout_s: float = 30.0
) -> None:
    """Delete ``name`` and create it again, empty, with ``partitions`` and ``configs``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        with contextlib.suppress(UnknownTopicOrPartitionError):
            await admin.delete_topics([name])
        deadline = time.monotonic() + timeout_s
        while True:
            response = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
            code = response.topic_errors[0][1]
            if code == 0:
                return
            if for_code(code) is not TopicAlreadyExistsError or time.monotonic() > deadline:
                raise AssertionError(f"cannot re-create {name}: {for_code(code).message}")
            await asyncio.sleep(0.5)  # the deletion is still in progress
    finally:
        await admin.close()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact sample name) with these labels in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, float]:
    """Wait up to ``timeout_s`` for ``proc`` to exit: (exit code or None, seconds waited)."""
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - t0


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it was started in a new session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def script_command(script: Path) -> list[str]:
    """The command line that runs a worker script under tests/ with this interpreter."""
    return [sys.executable, str(script)]


class _RawName(str):
    """A header name that encodes to the given bytes (the Python record builder calls ``.encode``)."""

    raw: bytes = b""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def _produce_raw_header_name(bootstrap: str, topic: str, partition: int, name: bytes, value: bytes) -> Coords:
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        # aiokafka's C builder encodes header names itself; its Python twin asks the name to encode itself
        batch._builder = _DefaultRecordBatchBuilderPy(
            magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0,
            batch_size=1 << 20,
        )  # fmt: skip
        header = _RawName("x")
        header.raw = name
        assert batch.append(key=b"c-raw", value=value, timestamp=None, headers=[(header, b"v")]) is not None
        meta = await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
    return (meta.partition, meta.offset)


def produce_with_raw_header_name(bootstrap: str, topic: str, partition: int, name: bytes, value: bytes) -> Coords:
    """Produce one record whose header name is the bytes ``name`` (e.g. not UTF-8, which the Kafka protocol
    does not check and Java's String-typed API cannot write, but a raw client can)."""
    return asyncio.run(_produce_raw_header_name(bootstrap, topic, partition, name, value))
