"""Real workers for the live Prometheus check: ``emotion-stream worker`` subprocesses on a local Kafka that
have processed messages (repeats for cache hits, malformed ones for dead letters), so their labelled
series exist as they do in production.

The workers are those of the integration tests (``tests.integration.conftest.Worker``); the broker is one
of their own, so this module's checks also run alone.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.devtools.clients import chat_message
from stream_app.devtools.kafka_local import free_port, local_kafka
from stream_app.errors import ModelError
from stream_app.settings import load_settings
from tests.integration.conftest import Worker, make_topics
from tests.integration.helpers import Until, collect, dev_texts, produce
from tests.integration.worker_http import probe, samples

__all__ = ["MALFORMED", "MESSAGES", "real_workers"]

MESSAGES = 120
"""Valid messages produced: 60 texts, each twice (the second time answered by the cache)."""
MALFORMED = [b"{not json", b"\xff\xfe", b'{"text": 3}']


def _wait_all_hold_partitions(workers: list[Worker], partitions: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in workers:
            assert w.process is not None and w.process.poll() is None, w.log_tail()
        try:
            held = [samples(w.metrics_port).get(("emotion_assigned_partitions", ()), 0.0) for w in workers]
        except OSError:  # a metrics port not open yet
            held = [0.0]
        ready = [probe(w.metrics_port, "/readyz").status == 200 for w in workers]
        if all(held) and sum(held) == partitions and all(ready):
            return
        time.sleep(0.5)
    raise AssertionError(f"workers not all ready with partitions: {[w.log_tail(1500) for w in workers]}")


@contextlib.contextmanager
def real_workers(cache_dir: Path, folder: Path, n: int = 2, partitions: int = 4) -> Iterator[list[int]]:
    """``n`` workers of one group on a ``partitions``-partition input, after they processed
    :data:`MESSAGES` valid and ``len(MALFORMED)`` malformed messages; yields their metrics ports."""
    settings = load_settings()
    try:
        from stream_app.service import resolve_model_path

        model = resolve_model_path(settings)
    except ModelError as exc:  # the set-up script builds it: a missing model is a broken set-up
        pytest.fail(f"{exc} (run scripts/setup.sh first)")
    with local_kafka(cache_dir, folder / "kafka") as kafka:
        topics = make_topics(kafka, partitions)
        app_id = f"emotion-prom-{uuid.uuid4().hex[:8]}"
        workers = []
        for i in range(n):
            port = free_port()
            env = {
                **os.environ,
                "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S": "6",
                "EMOTION_STREAM_WORKER__APP_ID": app_id,
                "EMOTION_STREAM_WORKER__WORKER_ID": f"prom-{i}",
                "EMOTION_STREAM_WORKER__STATE_DIR": str(folder / f"state-{i}"),
                "EMOTION_STREAM_METRICS__PORT": str(port),
                "EMOTION_STREAM_MODEL__PATH": model,
                "EMOTION_STREAM_MODEL__NUM_THREADS": "1",
                **topics.env(),
            }
            workers.append(Worker(env=env, log_path=folder / f"worker-{i}.log", metrics_port=port))
        try:
            for w in workers:
                w.start()
            _wait_all_hold_partitions(workers, partitions, timeout_s=180)
            texts = dev_texts(settings.data.goemotions_dir, MESSAGES // 2)
            records: list[tuple[bytes | None, bytes | None]] = [
                # a repeat has its original's key: the same partition, so the same worker's cache answers it
                chat_message(f"m-{i}", f"c-{i % len(texts) % 16}", texts[i % len(texts)])
                for i in range(MESSAGES)
            ]
            records += [(f"c-{i}".encode(), value) for i, value in enumerate(MALFORMED)]
            produce(kafka.bootstrap_servers, topics.input, records[: MESSAGES // 2])
            collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: MESSAGES // 2}), 120)
            produce(kafka.bootstrap_servers, topics.input, records[MESSAGES // 2 :])  # repeats: cache hits
            done = Until({topics.events: MESSAGES, topics.dead_letters: len(MALFORMED)})
            collect(kafka.bootstrap_servers, [topics.events, topics.dead_letters], done, 120)
            yield [w.metrics_port for w in workers]
        finally:
            for w in workers:
                w.stop(timeout_s=20)
                w.cleanup()
