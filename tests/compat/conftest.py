"""Fixtures of the compatibility suite: brokers, supervised workers, topics, and the closing table.

- ``kafka`` / ``secure_kafka`` / ``model_path``: the integration suite's session fixtures (one broker
  each per session, shared by every compat test; each test uses its own topics and consumer group).
- ``spawn``: starts ``emotion-stream worker`` subprocesses under a small supervisor that restarts a
  worker that exits on its own, as Kubernetes or compose would, and counts those restarts: the suite's
  promise is that the count stays 0 whatever the producers send.
- ``closing_table``: every test adds its rows; the table is rewritten after each row to
  ``$EMOTION_STREAM_COMPAT_TABLE`` (default ``/tmp/emotion-compat/closing-table.md``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_app.devtools.kafka_local import free_port, kafka_env, without_kafka_connection
from stream_app.devtools.processes import terminate
from stream_app.devtools.stack import wait_ready
from stream_app.errors import InfrastructureError
from stream_app.settings import KafkaSettings
from tests.compat.helpers import Row, kcat_path

# the integration suite's session fixtures (a broker, a TLS/SASL broker, the built model)
from tests.integration.conftest import kafka, model_path, secure_kafka  # noqa: F401

REPO_ROOT = str(Path(__file__).resolve().parents[2])
"""The worktree whose ``stream_app`` the workers run (never the shared virtualenv's editable install)."""
TABLE_PATH = Path(os.environ.get("EMOTION_STREAM_COMPAT_TABLE", "/tmp/emotion-compat/closing-table.md"))


# ------------------------------------------------------------------------------------------ topics
@dataclass(frozen=True)
class CompatTopics:
    input: str
    events: str
    metrics: str
    dead_letters: str
    conversations: str
    alerts: str

    @classmethod
    def fresh(cls, prefix: str = "compat") -> CompatTopics:
        tag = f"{prefix}.{uuid.uuid4().hex[:8]}"
        return cls(f"{tag}.chat.messages.v1", f"{tag}.emotion.events.v1", f"{tag}.emotion.metrics.v1",
                   f"{tag}.chat.messages.dlq.v1", f"{tag}.emotion.conversations.v1",
                   f"{tag}.emotion.alerts.v1")  # fmt: skip

    @property
    def names(self) -> list[str]:
        return [self.input, self.events, self.metrics, self.dead_letters, self.conversations, self.alerts]

    def env(self) -> dict[str, str]:
        return {
            "EMOTION_STREAM_TOPICS__INPUT": self.input,
            "EMOTION_STREAM_TOPICS__EVENTS": self.events,
            "EMOTION_STREAM_TOPICS__METRICS": self.metrics,
            "EMOTION_STREAM_TOPICS__DEAD_LETTERS": self.dead_letters,
            "EMOTION_STREAM_TOPICS__CONVERSATIONS": self.conversations,
            "EMOTION_STREAM_TOPICS__ALERTS": self.alerts,
        }


def create_topics(kafka_target: KafkaSettings | str, topics: CompatTopics, partitions: int,
                  input_config: dict[str, str] | None = None) -> None:  # fmt: skip
    """Create the six topics with confluent-kafka's AdminClient (the input with ``input_config``)."""
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # re-exported from cimpl

    from tests.compat.helpers import confluent_admin

    admin = confluent_admin(kafka_target)
    new = [NewTopic(topics.input, partitions, 1, config=input_config or {})]
    new += [NewTopic(t, partitions, 1) for t in topics.names[1:]]
    for name, fut in admin.create_topics(new, operation_timeout=30).items():
        fut.result(timeout=60)
        assert name


# ------------------------------------------------------------------------------------------ workers
@dataclass
class SupervisedWorker:
    """One ``emotion-stream worker`` and a supervisor thread that restarts it if it exits on its own."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int
    max_restarts: int = 3
    command: tuple[str, ...] = (sys.executable, "-m", "stream_app.cli", "worker")
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    _stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _monitor: threading.Thread | None = None

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                list(self.command),
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> SupervisedWorker:
        """Start (or, after :meth:`stop`, start again: a deliberate start is not a restart)."""
        with self._lock:
            self._stopping = False
            self._launch()
        self._monitor = threading.Thread(target=self._supervise, name="compat-supervisor", daemon=True)
        self._monitor.start()
        return self

    def _supervise(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                if self._stopping:
                    return
                proc = self.process
                if proc is None or proc.poll() is None:
                    continue
                self.exit_codes.append(proc.returncode)
                self.restarts += 1
                if self.restarts > self.max_restarts:
                    return
                self._launch()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """The model is loaded and the worker holds input partitions (its /metrics says so)."""
        try:
            wait_ready(self.metrics_port, None, timeout_s)
        except InfrastructureError as exc:
            raise AssertionError(f"{exc} (exits: {self.exit_codes}):\n{self.log_tail()}") from exc

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """A deliberate stop (SIGTERM); returns the exit code."""
        with self._lock:
            self._stopping = True
            proc = self.process
        if self._monitor is not None:
            self._monitor.join(5)
        if proc is None:
            return None
        terminate(proc, timeout_s)
        return proc.returncode

    def kill_all(self) -> None:
        with self._lock:
            self._stopping = True
            proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (a counter's ``_total`` sample) matching ``labels``."""
        total = 0.0
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name in (name, f"{name}_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    def log_lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log_text().splitlines() if rx.search(line)]


Spawn = Callable[..., SupervisedWorker]


@pytest.fixture
def spawn(model_path: str, tmp_path: Path) -> Iterator[Spawn]:  # noqa: F811 -- the imported fixture
    """``spawn(kafka_settings, topics, name=..., group=..., defaults=False, **env)`` -> a started worker.

    Each test gets its own consumer group (app id) unless ``group`` is given. ``defaults=True`` leaves the
    topic partition count and every tuning setting at their defaults (only the cluster, topics, model,
    state folder and metrics port are given).
    """
    workers: list[SupervisedWorker] = []
    group = f"compat-{uuid.uuid4().hex[:8]}"

    def make(
        kafka_target: KafkaSettings,
        topics: CompatTopics | None,
        name: str = "w1",
        *,
        group_id: str | None = None,
        defaults: bool = False,
        **overrides: str,
    ) -> SupervisedWorker:
        port = free_port()
        env = {
            **without_kafka_connection(os.environ),
            **kafka_env(kafka_target),
            "EMOTION_STREAM_WORKER__APP_ID": group_id or group,
            "EMOTION_STREAM_WORKER__WORKER_ID": name,
            "EMOTION_STREAM_WORKER__STATE_DIR": str(tmp_path / f"state-{name}"),
            "EMOTION_STREAM_METRICS__PORT": str(port),
            "EMOTION_STREAM_MODEL__PATH": model_path,
            "PYTHONPATH": REPO_ROOT,
            **(topics.env() if topics is not None else {}),
        }
        if not defaults:
            env |= {"EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S": "6", "EMOTION_STREAM_MODEL__NUM_THREADS": "1"}
        env |= overrides
        worker = SupervisedWorker(env=env, log_path=tmp_path / f"{name}.log", metrics_port=port).start()
        workers.append(worker)
        return worker

    yield make
    for w in workers:
        w.stop(timeout_s=20)
        w.kill_all()


# ------------------------------------------------------------------------------------------ the table
class ClosingTable:
    """Rows of the closing table, rewritten to :data:`TABLE_PATH` after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.started = time.monotonic()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.write()
        return row

    def render(self) -> str:
        lines = [
            "| condition | in | events | dead letters | missing | worker restarts |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            mark = "" if r.ok else " **FAIL**"
            lines.append(f"| {r.condition}{mark} | {r.inputs} | {r.events} | {r.dead_letters} | {r.missing} "
                         f"| {r.restarts} |")  # fmt: skip
        wrong = [f"- {r.condition}: {w}" for r in self.rows for w in r.wrong[:5]]
        return "\n".join(lines + (["", *wrong] if wrong else [])) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        elapsed = time.monotonic() - self.started
        self.path.write_text(f"# emotion-stream compatibility suite ({time.strftime('%Y-%m-%d %H:%M:%S')}, "
                             f"{elapsed:.0f} s into the session)\n\n{self.render()}")  # fmt: skip


@pytest.fixture(scope="session")
def closing_table() -> Iterator[ClosingTable]:
    table = ClosingTable(TABLE_PATH)
    yield table
    if table.rows:
        table.write()


@pytest.fixture(scope="session")
def kcat() -> str:
    """The kcat binary (``apt-get install -y kcat``)."""
    path = kcat_path()
    if path is None:
        pytest.skip("kcat is not installed (apt-get install -y kcat); the kcat-made inputs cannot be produced")
    return path
