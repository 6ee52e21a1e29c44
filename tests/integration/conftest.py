"""A real Apache Kafka for the session, and workers run as real subprocesses (so they can be killed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka, free_port, local_kafka
from stream_app.devtools.processes import terminate
from stream_app.devtools.stack import wait_ready
from stream_app.errors import InfrastructureError, ModelError
from stream_app.settings import load_settings
from stream_app.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def kafka(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with local_kafka(cache_dir, tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def secure_kafka(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A second local broker with TLS and SASL listeners beside its PLAINTEXT one.

    - ``secure_kafka.listeners``: ``{"PLAINTEXT"|"SSL"|"SASL_SSL"|"SASL_PLAINTEXT": "127.0.0.1:port"}``;
    - ``secure_kafka.security.certs``: ``ca_cert`` (what ``ssl_cafile`` names), the client certificate and
      its encrypted key (the SSL listener requires a client certificate: mutual TLS);
    - ``secure_kafka.security.users``: one :class:`SaslUser` per mechanism (PLAIN, SCRAM-SHA-256/512);
    - ``secure_kafka.client_settings("SASL_SSL", "SCRAM-SHA-256")``: working client ``KafkaSettings``;
      ``kafka_env(...)`` of those makes a worker subprocess use them.

    The certificates name only 127.0.0.1 (``localhost`` fails hostname verification, on purpose).
    """
    with local_kafka(cache_dir, tmp_path_factory.mktemp("secure-kafka"), secure=True) as broker:
        yield broker


@pytest.fixture(scope="session")
def model_path() -> str:
    from stream_app.service import resolve_model_path

    try:
        return resolve_model_path(load_settings())
    except ModelError as exc:  # the set-up script builds it; a missing model is a broken set-up, not a skip
        pytest.fail(f"{exc} (run scripts/setup.sh first)")


@dataclass
class Topics:
    input: str
    events: str
    metrics: str
    dead_letters: str
    partitions: int
    conversations: str = ""
    alerts: str = ""

    def env(self) -> dict[str, str]:
        return {
            "EMOTION_STREAM_TOPICS__INPUT": self.input,
            "EMOTION_STREAM_TOPICS__EVENTS": self.events,
            "EMOTION_STREAM_TOPICS__METRICS": self.metrics,
            "EMOTION_STREAM_TOPICS__DEAD_LETTERS": self.dead_letters,
            "EMOTION_STREAM_TOPICS__CONVERSATIONS": self.conversations,
            "EMOTION_STREAM_TOPICS__ALERTS": self.alerts,
            "EMOTION_STREAM_TOPICS__PARTITIONS": str(self.partitions),
        }

    @property
    def names(self) -> list[str]:
        return [self.input, self.events, self.metrics, self.dead_letters, self.conversations, self.alerts]


def make_topics(kafka: LocalKafka, partitions: int = 4) -> Topics:
    tag = uuid.uuid4().hex[:8]
    topics = Topics(
        input=f"chat.messages.v1.{tag}",
        events=f"emotion.events.v1.{tag}",
        metrics=f"emotion.metrics.v1.{tag}",
        dead_letters=f"chat.messages.dlq.v1.{tag}",
        partitions=partitions,
        conversations=f"emotion.conversations.v1.{tag}",
        alerts=f"emotion.alerts.v1.{tag}",
    )
    asyncio.run(ensure_topics(kafka.bootstrap_servers, topics.names, partitions))
    return topics


@dataclass
class Worker:
    """One ``emotion-stream worker`` subprocess."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_app.cli", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(self.process)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Ready = the model is loaded and the worker holds input partitions (from its /metrics)."""
        try:
            wait_ready(self.metrics_port, self.process, timeout_s)
        except InfrastructureError as exc:
            raise AssertionError(f"{exc}:\n{self.log_tail()}") from exc

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: bytes = resp.read()
        return body.decode()

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no final commit."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 40.0) -> None:
        if self.process is not None:
            terminate(self.process, timeout_s)

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def spawn_worker(kafka: LocalKafka, model_path: str, tmp_path: Path) -> Iterator[object]:
    """Factory: ``spawn_worker(topics, name=..., **env overrides)`` -> a started :class:`Worker`."""
    workers: list[Worker] = []
    app_id = f"emotion-test-{uuid.uuid4().hex[:8]}"

    def spawn(topics: Topics, name: str = "w1", state_dir: Path | None = None, **overrides: str) -> Worker:
        port = free_port()
        env = {
            **os.environ,
            "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S": "6",
            "EMOTION_STREAM_WORKER__APP_ID": app_id,
            "EMOTION_STREAM_WORKER__WORKER_ID": name,
            "EMOTION_STREAM_WORKER__STATE_DIR": str(state_dir or tmp_path / f"state-{name}"),
            "EMOTION_STREAM_METRICS__PORT": str(port),
            "EMOTION_STREAM_MODEL__PATH": model_path,
            "EMOTION_STREAM_MODEL__NUM_THREADS": "1",
            **topics.env(),
            **overrides,
        }
        worker = Worker(env=env, log_path=tmp_path / f"{name}.log", metrics_port=port).start()
        workers.append(worker)
        return worker

    yield spawn
    for w in workers:
        w.stop(timeout_s=20)
        w.cleanup()
