"""Records a chat service's clients can send that our own helpers never do: tombstones, binary headers.

- Tombstones (a null value, with or without key or headers) from confluent-kafka, aiokafka and kcat
  (``-Z``): each is a dead letter with its coordinates, never a crash or a silent skip.
- Headers as Kafka allows them: values that are not UTF-8, null values, the same name twice, a valid W3C
  ``traceparent`` (the event keeps its trace id), an invalid or duplicated one (ignored, never a reason to
  reject the message), a large binary header on a valid and on a malformed record.
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

WAIT_S = 90.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()
OTHER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
BIG = bytes(range(256)) * 800  # 200 KiB, every byte value


def _tombstone(key: bytes | None, headers: tuple[tuple[str, bytes | None], ...] = ()) -> Msg:
    return Msg(key, None, "dead", None, headers)


def test_tombstones_from_every_producer(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, kcat: str, data_dir: Path, tmp_path: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("tombstones")
    create_topics(settings, topics, 3)
    worker = spawn(settings, topics)
    texts = dev_texts(data_dir, 20)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        lib = [_tombstone(f"lib-{i}".encode()) for i in range(4)]
        lib += [_tombstone(None), _tombstone(b"lib-h", (("x-bin", b"\xff\x00"), ("traceparent", TRACEPARENT)))]
        # valid messages between the tombstones: their neighbours' fate is theirs alone
        lib += [chat(f"tomb-lib-{i}", texts[i], conversation=f"lib-{i}") for i in range(6)]
        placed = produce_confluent(settings, topics.input, lib)
        aio = [_tombstone(f"aio-{i}".encode()) for i in range(3)] + [chat("tomb-aio", texts[7])]
        placed |= produce_aiokafka(settings, topics.input, aio, compression="zstd")
        by_kcat = [_tombstone(f"kcat-{i}".encode()) for i in range(2)]
        kcat_produce(settings, topics.input, by_kcat, tmp_path / "kcat")
        placed |= locate(settings, topics.input, by_kcat)
        waited = watcher.wait_for(placed, WAIT_S)
        row = closing_table.add(account("tombstones (confluent-kafka, aiokafka, kcat -Z)", placed, watcher,
                                        worker.restarts))  # fmt: skip
        outputs = watcher.outputs_for(placed)
    assert waited >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert row.dead_letters == 11
    for coord, msg in placed.items():
        if msg.value is None:
            doc = outputs[coord][0].doc
            assert doc["raw_value_b64"] in (None, ""), doc  # a null value is not an empty one
            assert doc["reason"] in ("undecodable", "schema"), doc
    assert worker.alive, worker.log_tail()


def _headers_cases(texts: list[str]) -> list[Msg]:
    cases: list[tuple[tuple[str, bytes | None], ...]] = [
        (("x-binary", b"\xff\xfe\x00\x80\xc3\x28"),),
        (("x-dup", b"one"), ("x-dup", b"two"), ("x-dup", b"\xff")),
        (("x-null", None), ("x-empty", b"")),
        (("traceparent", TRACEPARENT), ("tracestate", b"vendor=opaque")),
        (("traceparent", b"\xff\xfe not a trace"),),
        (("traceparent", TRACEPARENT), ("traceparent", f"00-{OTHER_TRACE_ID}-00f067aa0ba902b7-01".encode())),
        (("tracestate", b"\xc3\x28\xff"), ("traceparent", TRACEPARENT.upper())),
        (("x-big", BIG), ("traceparent", TRACEPARENT)),
        tuple((f"h{i}", bytes([i]) * 3) for i in range(200)),
        (("", b"empty name"), ("x-\u00e9\u4e2d", b"\x00")),
    ]
    return [chat(f"hdr-{n}", texts[n], conversation=f"h-{n}", headers=h) for n, h in enumerate(cases)]


def test_binary_and_duplicate_headers_and_traceparent(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, kcat: str, data_dir: Path, tmp_path: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("headers")
    create_topics(settings, topics, 3)
    worker = spawn(settings, topics)
    texts = dev_texts(data_dir, 40)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        lib = _headers_cases(texts)
        bad = malformed("hdr-bad")
        lib.append(Msg(bad.key, bad.value, "dead", None, (("x-big", BIG), ("traceparent", TRACEPARENT))))
        placed = produce_confluent(settings, topics.input, lib)
        aio = [Msg(m.key, m.value.replace(b"hdr-", b"hdr-aio-"), m.expect, f"hdr-aio-{n}", m.headers)
               for n, m in enumerate(_headers_cases(texts[20:])) if m.value is not None]  # fmt: skip
        placed |= produce_aiokafka(settings, topics.input, aio)
        by_kcat = [chat("hdr-kcat", texts[30], conversation="kcat",
                        headers=(("traceparent", TRACEPARENT), ("x-dup", b"a"), ("x-dup", b"b")))]  # fmt: skip
        kcat_produce(settings, topics.input, by_kcat, tmp_path / "kcat")
        placed |= locate(settings, topics.input, by_kcat)
        waited = watcher.wait_for(placed, WAIT_S)
        row = closing_table.add(account("binary headers (non-UTF-8, null, duplicate names, traceparent)", placed,
                                        watcher, worker.restarts))  # fmt: skip
        outputs = watcher.outputs_for(placed)
    assert waited >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert row.dead_letters == 1
    # a valid traceparent header carries the trace through to the event's headers; an invalid one is
    # ignored, never a reason to reject; with two, either may win or neither (Kafka does not say)
    traced: dict[Coord, str] = {}
    for coord, msg in placed.items():
        if msg.expect != "event":
            continue
        header_trace = dict(outputs[coord][0].headers).get("traceparent", b"").decode()
        given = [v for k, v in msg.headers if k == "traceparent"]
        if given == [TRACEPARENT]:
            traced[coord] = header_trace
            assert TRACE_ID in header_trace, (msg.headers[:3], outputs[coord][0].headers)
        elif given and TRACEPARENT not in given:
            assert TRACE_ID not in header_trace, (msg.headers[:3], header_trace)
    assert len(traced) == 5  # two cases from librdkafka, two from aiokafka, one from kcat
    assert worker.alive, worker.log_tail()
