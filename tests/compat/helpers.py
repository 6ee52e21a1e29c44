"""Third-party producers, an output watcher and the accounting behind the closing table.

Inputs come from clients this project did not write: confluent-kafka (librdkafka), kcat (a second,
older librdkafka, driven as a command line) and aiokafka used directly (not through ``stream_app``'s
helpers). Every produced record is known by its source coordinates (topic, partition, offset): from the
producer's own delivery report where it gives one, else read back from the input topic by its
``message_id``. Outputs are matched to inputs by the ``source`` coordinates every event and dead letter
carries, so "in = events + dead letters, nothing missing" is checked record by record, not by counts.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_app.kafka_config import aiokafka_client_kwargs, as_kafka_settings, librdkafka_config
from stream_app.settings import KafkaSettings

Coord = tuple[str, int, int]
"""(topic, partition, offset) of an input record."""
Expect = Literal["event", "dead"]

__all__ = [
    "Coord",
    "Expect",
    "Msg",
    "OutputWatcher",
    "Row",
    "account",
    "batch_codecs",
    "chat",
    "confluent_admin",
    "kcat_path",
    "kcat_produce",
    "locate",
    "malformed",
    "missing_report",
    "produce_aiokafka",
    "produce_confluent",
    "watermarks",
]


@dataclass(frozen=True)
class Msg:
    """One record to produce, with the verdict the worker must reach on it."""

    key: bytes | None
    value: bytes | None
    expect: Expect
    message_id: str | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    partition: int | None = None


def chat(
    message_id: str,
    text: str,
    *,
    conversation: str = "c-1",
    partition: int | None = None,
    headers: Sequence[tuple[str, bytes | None]] = (),
    sent_at: str = "2026-11-30T10:00:00Z",
) -> Msg:
    """A valid ``chat_message.v1`` (it must become an event)."""
    doc = {
        "message_id": message_id,
        "conversation_id": conversation,
        "user_id": "u-compat",
        "text": text,
        "sent_at": sent_at,
    }
    return Msg(conversation.encode(), orjson.dumps(doc), "event", message_id, tuple(headers), partition)


def malformed(tag: str, *, partition: int | None = None) -> Msg:
    """A record no contract accepts (it must become a dead letter)."""
    return Msg(b"c-bad", b'{"message_id": "' + tag.encode() + b'", "broken": ', "dead", None, (), partition)


# ------------------------------------------------------------------------------------------ producers
def _confluent_config(kafka: KafkaSettings | str) -> dict[str, str]:
    return librdkafka_config(as_kafka_settings(kafka), client_id="compat-librdkafka")


def confluent_admin(kafka: KafkaSettings | str) -> Any:
    """A confluent-kafka AdminClient (the "other tool" that creates and alters things)."""
    from confluent_kafka.admin import AdminClient

    config: dict[str, str | int | float | bool] = {**_confluent_config(kafka)}
    return AdminClient(config)


def produce_confluent(
    kafka: KafkaSettings | str,
    topic: str,
    msgs: Sequence[Msg],
    *,
    compression: str = "none",
    producer: Any | None = None,
    flush: bool = True,
) -> dict[Coord, Msg]:
    """Produce with librdkafka (confluent-kafka); the coordinates come from its delivery reports.

    With ``producer`` (e.g. a transactional one) that producer is used and left open.
    """
    from confluent_kafka import Producer

    own = producer is None
    if producer is None:
        producer = Producer(
            {**_confluent_config(kafka), "acks": "all", "compression.type": compression, "linger.ms": 20}
        )
    placed: dict[Coord, Msg] = {}
    errors: list[str] = []

    def report(msg: Msg) -> Any:
        def on_delivery(err: Any, rec: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                placed[(rec.topic(), rec.partition(), rec.offset())] = msg

        return on_delivery

    for m in msgs:
        kwargs: dict[str, Any] = {"key": m.key, "value": m.value, "on_delivery": report(m)}
        if m.headers:
            kwargs["headers"] = list(m.headers)
        if m.partition is not None:
            kwargs["partition"] = m.partition
        producer.produce(topic, **kwargs)
        producer.poll(0)
    if flush or own:
        left = producer.flush(60)
        assert left == 0, f"librdkafka could not deliver {left} record(s): {errors}"
    assert not errors, errors
    return placed


def produce_aiokafka(
    kafka: KafkaSettings | str, topic: str, msgs: Sequence[Msg], *, compression: str | None = None
) -> dict[Coord, Msg]:
    """Produce with a plain aiokafka producer; coordinates from its record metadata."""

    async def run() -> dict[Coord, Msg]:
        producer = AIOKafkaProducer(
            **aiokafka_client_kwargs(as_kafka_settings(kafka), client_id="compat-aiokafka"),
            acks="all",
            compression_type=compression,
            linger_ms=20,
        )
        await producer.start()
        try:
            futures = []
            for m in msgs:
                headers = [(k, v if v is not None else b"") for k, v in m.headers] or None
                fut = await producer.send(topic, value=m.value, key=m.key, partition=m.partition, headers=headers)
                futures.append((m, fut))
            placed: dict[Coord, Msg] = {}
            for m, fut in futures:
                meta = await fut
                placed[(meta.topic, meta.partition, meta.offset)] = m
            return placed
        finally:
            await producer.stop()

    return asyncio.run(run())


def kcat_path() -> str | None:
    return shutil.which("kcat") or shutil.which("kafkacat")


def kcat_produce(
    kafka: KafkaSettings | str,
    topic: str,
    msgs: Sequence[Msg],
    folder: Path,
    *,
    compression: str = "none",
) -> None:
    """Produce with ``kcat -P``.

    Records with a value go one file per record (kcat sends each file as one message; it skips an empty
    file). Tombstones (value None) go as ``key:`` lines on stdin with ``-K: -Z`` (an empty value sent as
    NULL). kcat prints no offsets: the caller finds the records with :func:`locate`. All ``msgs`` of one
    call share partition and headers, and key unless they are tombstones.
    """
    kcat = kcat_path()
    assert kcat is not None, "kcat is not installed"
    assert msgs
    first = msgs[0]
    tombstones = first.value is None
    assert all((m.value is None) == tombstones for m in msgs)
    assert all(m.partition == first.partition and m.headers == first.headers for m in msgs)
    assert tombstones or all(m.key == first.key for m in msgs)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in _confluent_config(kafka).items() if k != "bootstrap.servers"}
    config |= {"compression.codec": compression, "acks": "all"}
    conf_file = folder / "kcat.conf"
    conf_file.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    conf_file.chmod(0o600)
    cmd = [kcat, "-P", "-F", str(conf_file), "-b", as_kafka_settings(kafka).bootstrap_servers, "-t", topic]
    if first.partition is not None:
        cmd += ["-p", str(first.partition)]
    for name, value in first.headers:
        cmd += ["-H", f"{name}={(value or b'').decode()}"]
    stdin = None
    if tombstones:
        assert all(m.key and b":" not in m.key and b"\n" not in m.key for m in msgs)
        cmd += ["-K:", "-Z"]
        stdin = b"".join((m.key or b"") + b":\n" for m in msgs)
    else:
        if first.key is not None:
            cmd += ["-k", first.key.decode()]
        for n, m in enumerate(msgs):
            path = folder / f"msg-{time.monotonic_ns()}-{n}.bin"
            path.write_bytes(m.value or b"")
            cmd.append(str(path))
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, f"kcat failed ({done.returncode}): {done.stderr[-2000:]!r}"


def locate(kafka: KafkaSettings | str, topic: str, msgs: Sequence[Msg], timeout_s: float = 60.0) -> dict[Coord, Msg]:
    """Read ``topic`` from the beginning (read_committed) and find where ``msgs`` landed.

    Each is found by its (key, value), which must be unique in the topic (for producers that report no
    offsets, such as kcat).
    """
    wanted = {(m.key, m.value): m for m in msgs}
    assert len(wanted) == len(msgs), "locate needs a unique (key, value) per record"

    async def run() -> dict[Coord, Msg]:
        consumer = AIOKafkaConsumer(
            topic,
            **aiokafka_client_kwargs(as_kafka_settings(kafka), client_id="compat-locate"),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        found: dict[Coord, Msg] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(found) < len(wanted) and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=300)
                for tp, records in batch.items():
                    for r in records:
                        m = wanted.get((r.key, r.value))
                        if m is not None:
                            found[(tp.topic, tp.partition, r.offset)] = m
        finally:
            await consumer.stop()
        return found

    found = asyncio.run(run())
    assert len(found) == len(wanted), f"found {len(found)} of {len(wanted)} records in {topic}"
    return found


_CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def batch_codecs(log_dirs: Path, topic: str) -> Counter[str]:
    """How the broker stored ``topic``'s record batches: codec name -> batch count (control batches and
    transaction markers left out), read from the local broker's log segments (record batch format v2:
    the codec is in the low 3 bits of the attributes)."""
    counts: Counter[str] = Counter()
    for folder in log_dirs.glob(f"{topic}-*"):
        if not folder.name.removeprefix(f"{topic}-").isdigit():
            continue
        for segment in folder.glob("*.log"):
            data = segment.read_bytes()
            pos = 0
            while pos + 23 <= len(data):
                _base, length = struct.unpack_from(">qi", data, pos)
                if length <= 0:
                    break
                magic = data[pos + 16]
                attributes = struct.unpack_from(">h", data, pos + 21)[0]
                assert magic == 2, f"record batch magic {magic} in {segment}"
                if not attributes & 0x20:  # not a control batch
                    counts[_CODEC_NAMES[attributes & 0x07]] += 1
                pos += 12 + length
    return counts


def watermarks(kafka: KafkaSettings | str, topic: str, partitions: int) -> dict[int, tuple[int, int]]:
    """(low, high) watermark of each partition of ``topic``, as librdkafka sees them."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**_confluent_config(kafka), "group.id": "compat-watermarks"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in range(partitions)}
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------ outputs
@dataclass
class Output:
    kind: Expect
    doc: dict[str, Any]
    headers: tuple[tuple[str, bytes], ...]
    seen_at: float


class OutputWatcher:
    """Reads the events and dead-letter topics in a background thread for the whole test.

    ``outputs`` maps each source coordinate to everything produced for it (at-least-once: a record may
    have been processed more than once after a restart).
    """

    def __init__(self, kafka: KafkaSettings | str, events: str, dead_letters: str) -> None:
        self.kafka = as_kafka_settings(kafka)
        self.topics = {events: "event", dead_letters: "dead"}
        self.outputs: dict[Coord, list[Output]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="compat-watcher", daemon=True)

    def __enter__(self) -> OutputWatcher:
        self._thread.start()
        assert self._started.wait(60), "the output watcher's consumer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # noqa: BLE001 -- reported by the next wait
            self._error = exc
            self._started.set()

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.topics,
            **aiokafka_client_kwargs(self.kafka, client_id="compat-watcher"),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=1000,
        )
        await consumer.start()
        self._started.set()
        try:
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                now = time.monotonic()
                for tp, records in batch.items():
                    kind: Any = self.topics[tp.topic]
                    for r in records:
                        doc = orjson.loads(r.value or b"null")
                        src = doc["source"]
                        coord = (str(src["topic"]), int(src["partition"]), int(src["offset"]))
                        out = Output(kind, doc, tuple(r.headers or ()), now)
                        with self._lock:
                            self.outputs.setdefault(coord, []).append(out)
        finally:
            await consumer.stop()

    def _check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the output watcher failed: {self._error!r}")

    def snapshot(self) -> dict[Coord, list[Output]]:
        self._check()
        with self._lock:
            return {c: list(v) for c, v in self.outputs.items()}

    def wait_for(self, coords: Iterable[Coord], timeout_s: float) -> float:
        """Wait until every coordinate has an output; returns the seconds waited (fails on timeout)."""
        wanted = set(coords)
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            self._check()
            with self._lock:
                left = wanted - self.outputs.keys()
            if not left:
                return time.monotonic() - start
            if time.monotonic() > deadline:
                return -1.0
            time.sleep(0.2)

    def outputs_for(self, coords: Iterable[Coord]) -> dict[Coord, list[Output]]:
        snap = self.snapshot()
        return {c: snap[c] for c in coords if c in snap}


# ------------------------------------------------------------------------------------------ accounting
@dataclass
class Row:
    """One line of the closing table."""

    condition: str
    inputs: int
    events: int
    dead_letters: int
    missing: int
    restarts: int
    wrong: list[str] = field(default_factory=list)
    """Records whose outputs are not what their input calls for (an event for a malformed record, ...)."""

    @property
    def ok(self) -> bool:
        return (
            self.missing == 0
            and self.restarts == 0
            and not self.wrong
            and self.inputs == self.events + self.dead_letters
        )


def account(condition: str, expected: Mapping[Coord, Msg], watcher: OutputWatcher, restarts: int) -> Row:
    """Match outputs to ``expected`` inputs by source coordinates; one row of the table."""
    got = watcher.outputs_for(expected)
    events = dead = 0
    wrong: list[str] = []
    for coord, msg in expected.items():
        outs = got.get(coord)
        if not outs:
            continue
        kinds = {o.kind for o in outs}
        if kinds == {"event"}:
            events += 1
        elif kinds == {"dead"}:
            dead += 1
        else:
            wrong.append(f"{coord}: both an event and a dead letter")
            continue
        if kinds != {msg.expect}:
            wrong.append(f"{coord}: {sorted(kinds)} for a record that calls for {msg.expect}")
        if msg.expect == "event" and kinds == {"event"}:
            ids = {o.doc.get("message_id") for o in outs}
            if ids != {msg.message_id}:
                wrong.append(f"{coord}: event message_id {ids} for {msg.message_id}")
    missing = sum(1 for c in expected if c not in got)
    return Row(condition, len(expected), events, dead, missing, restarts, wrong)


def missing_report(expected: Mapping[Coord, Msg], watcher: OutputWatcher, limit: int = 20) -> str:
    got = watcher.snapshot()
    left = sorted(c for c in expected if c not in got)
    return f"{len(left)} missing, e.g. {left[:limit]}"
