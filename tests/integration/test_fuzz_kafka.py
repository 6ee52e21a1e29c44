"""10,000 mixed records over a real Apache Kafka through a real worker: each one exactly one outcome.

The mix (seeded, reproducible): GoEmotions dev texts as valid chat messages, some with odd headers and
keys, and every kind of :mod:`tests.fuzzing` record (fields at their extremes, invalid documents, wire
breakage, tombstones, non-JSON bytes, values at the ``max_message_bytes`` boundary, swapped keys; the
records of hundreds of kilobytes twenty times rarer than in the unit suite). By source coordinates:
inputs = events + dead letters, with the reason the contract predicts, nothing missing, nothing extra;
every output validates and fits the producer limit; the worker never exits.
``EMOTION_STREAM_FUZZ_SEED`` and ``EMOTION_STREAM_FUZZ_KAFKA_INPUTS`` change the mix and its size locally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from stream_app.devtools.clients import chat_message
from tests.fuzzing import FuzzInput, RandomChooser, Tally, check_outputs, expected_outcome, gen_headers, gen_input
from tests.integration.conftest import make_topics
from tests.integration.helpers import dev_texts
from tests.integration.outcomes import ToSend, metric, produce, read_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = int(os.environ.get("EMOTION_STREAM_FUZZ_KAFKA_INPUTS", "10000"))
SEED = int(os.environ.get("EMOTION_STREAM_FUZZ_SEED", "15"))  # another seed explores another mix
MAX_MESSAGE_BYTES = 262_144  # the worker's defaults
MAX_TEXT_CHARS = 10_000
MAX_RECORD_BYTES = 1_048_576


def mixed_inputs(texts: list[str], n: int = N, seed: int = SEED) -> list[FuzzInput]:
    """``n`` records: about 60% plain GoEmotions messages (a fifth of them with odd headers or keys), the
    rest from the fuzz generator."""
    import orjson

    c = RandomChooser(seed)
    out: list[FuzzInput] = []
    for i in range(n):
        if c.integer(1, 10) <= 6:
            key, value = chat_message(f"g-{i}", f"conv-{c.integer(0, 49)}", c.pick(texts), user_id=f"u-{i % 97}")
            odd = c.integer(1, 5) == 1
            headers = gen_headers(c) if odd else ()
            if odd and c.integer(0, 1):
                key = c.pick([None, b"", b"\xff\xfe", "😀".encode() * 256, b"k" * 1025])
            out.append(FuzzInput("goemotions", key, value, headers, expect="event", doc=orjson.loads(value)))
        else:
            out.append(gen_input(c, texts=texts, max_message_bytes=MAX_MESSAGE_BYTES, heavy_every=20))
    return out


def test_ten_thousand_mixed_inputs_each_get_exactly_one_outcome(kafka: Any, spawn_worker: Any, data_dir: Path) -> None:
    topics = make_topics(kafka, partitions=4)
    worker = spawn_worker(topics)
    texts = dev_texts(data_dir, 3000)
    inputs = mixed_inputs(texts)
    worker.wait_ready()
    t0 = time.monotonic()
    coords = produce(kafka.bootstrap_servers, topics.input, [ToSend(i.key, i.value, i.headers) for i in inputs])
    produced_s = time.monotonic() - t0
    assert len(set(coords)) == N
    expected = {
        c: (
            inp,
            expected_outcome(
                inp, max_message_bytes=MAX_MESSAGE_BYTES, max_text_chars=MAX_TEXT_CHARS, overlong_reject=False
            ),
        )
        for c, inp in zip(coords, inputs, strict=True)
    }
    wanted = set(coords)
    out = read_outputs(
        kafka.bootstrap_servers,
        topics.events,
        topics.dead_letters,
        lambda o: wanted <= set(o.by_source),
        timeout_s=900,
        settle_s=5,
    )
    took = time.monotonic() - t0
    assert worker.process is not None and worker.process.poll() is None, (
        f"the worker exited with {worker.process.returncode if worker.process else None}:\n{worker.log_tail()}"
    )
    tally = Tally()
    problems = check_outputs(expected, out.by_source, max_record_bytes=MAX_RECORD_BYTES, tally=tally)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:50]) + "\n" + worker.log_tail()
    page = worker.scrape()
    assert metric(page, "emotion_messages_total") == N  # read once: nothing was processed twice
    assert metric(page, "emotion_events_total") == tally.outcomes["event"]
    print(f"\nfuzz over Kafka: {tally.line()}; produced in {produced_s:.1f} s, all outcomes after {took:.1f} s")
    # the run means something only if it reached every outcome the default settings allow
    assert tally.outcomes["event"] > N // 2, tally.line()
    assert {"undecodable", "too_large", "schema", "empty_text"} <= set(tally.outcomes), tally.line()
