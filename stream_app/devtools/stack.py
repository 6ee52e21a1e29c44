"""Run a worker (and, if no cluster is given, a local Apache Kafka) as child processes.

Used by ``emotion-stream demo``, the replay benchmark and the tests' helpers: everything started here
is stopped when the ``with`` block ends, Ctrl-C included, so no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from stream_app.devtools.kafka_local import kafka_env, local_kafka, without_kafka_connection
from stream_app.devtools.processes import terminate
from stream_app.errors import InfrastructureError
from stream_app.settings import KafkaSettings, Settings
from stream_app.topics import ensure_app_topics

__all__ = ["Stack", "local_stack", "wait_ready", "worker_process"]


@contextlib.contextmanager
def worker_process(
    env: Mapping[str, str], log_path: Path, command: tuple[str, ...] = ("worker",)
) -> Iterator[subprocess.Popen[bytes]]:
    """``emotion-stream worker`` (or another verb) as a child process, stopped with SIGTERM at exit."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", *command],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the parent, which stops the child in order
        )
    try:
        yield proc
    finally:
        terminate(proc)


def wait_ready(port: int, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 180.0) -> None:
    """Wait until a worker's /metrics says it holds input partitions (model loaded, group joined)."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/metrics"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfrastructureError(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read().decode()
        except OSError:
            body = ""
        for line in body.splitlines():
            if line.startswith("emotion_assigned_partitions ") and float(line.split()[1]) > 0:
                return
        time.sleep(0.3)
    raise InfrastructureError(f"worker not ready after {timeout_s:.0f}s")


@dataclass
class Stack:
    kafka: KafkaSettings
    """The cluster and how to log in to it (security settings included)."""
    worker: subprocess.Popen[bytes] | None
    worker_log: Path
    env: dict[str, str]

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers


@contextlib.contextmanager
def local_stack(
    settings: Settings, run_dir: Path, *, start_worker: bool = True, env: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """Kafka (local unless ``settings.kafka.bootstrap_servers``), the topics, and optionally a worker.

    With a cluster in the settings, its security settings reach the topic admin and the worker too.
    """
    with contextlib.ExitStack() as stack:
        kafka = settings.kafka
        if not kafka.bootstrap_servers:
            broker = stack.enter_context(local_kafka(settings.data.cache_dir, run_dir / "kafka"))
            kafka = broker.client_settings("PLAINTEXT")
        ensure_app_topics(settings, kafka=kafka)
        child_env = {
            **without_kafka_connection(os.environ),
            **kafka_env(kafka),
            "EMOTION_STREAM_WORKER__STATE_DIR": str(run_dir / "state"),
            **(env or {}),
        }
        log = run_dir / "worker.log"
        proc = stack.enter_context(worker_process(child_env, log)) if start_worker else None
        if proc is not None and settings.metrics.port:
            wait_ready(int(child_env.get("EMOTION_STREAM_METRICS__PORT", settings.metrics.port)), proc)
        yield Stack(kafka, proc, log, child_env)
