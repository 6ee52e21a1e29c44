"""Run a worker (and, if no cluster is given, a local Apache Kafka) as child processes.

Used by ``emotion-stream demo``, the replay benchmark and the tests' helpers: everything started here
is stopped when the ``with`` block ends, Ctrl-C included (a second Ctrl-C while they stop kills them:
:func:`~stream_app.devtools.processes.terminate`), so no process is left behind.

A worker is only ever judged by its own metrics port: the port is checked to be free before the worker
starts (another one is taken when it is not), and :func:`wait_ready` believes an answer only from a port
that the child process itself listens on. Another worker already on the default port once made a demo
report its own dead worker as ready.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from stream_app.devtools.kafka_local import free_port, kafka_env, local_kafka, without_kafka_connection
from stream_app.devtools.processes import terminate
from stream_app.errors import InfrastructureError
from stream_app.settings import KafkaSettings, Settings
from stream_app.topics import ensure_app_topics

__all__ = ["Stack", "listens_on", "local_stack", "port_is_free", "wait_ready", "worker_process"]


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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` now (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def wait_ready(port: int, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 180.0) -> None:
    """Wait until a worker's /metrics says it holds input partitions (model loaded, group joined).

    With ``proc``, only an answer from a port that ``proc`` listens on counts (not another process that
    happens to serve metrics there), and ``proc`` exiting ends the wait with an error at once.
    """
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/metrics"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfrastructureError(f"worker exited with {proc.returncode}")
        if proc is not None and not listens_on(proc.pid, port):
            time.sleep(0.3)
            continue
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
    metrics_port: int = 0
    """The worker's metrics port (0: none); not the configured one when that was taken."""
    port_taken: int | None = None
    """The configured metrics port, when something else already listened on it."""

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers


@contextlib.contextmanager
def local_stack(
    settings: Settings, run_dir: Path, *, start_worker: bool = True, env: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """Kafka (local unless ``settings.kafka.bootstrap_servers``), the topics, and optionally a worker.

    With a cluster in the settings, its security settings reach the topic admin and the worker too. The
    worker's metrics port is the configured one (``env`` first, then the settings) when it is free, else a
    free one (:attr:`Stack.metrics_port`, :attr:`Stack.port_taken`).
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
        port = int(child_env.get("EMOTION_STREAM_METRICS__PORT", settings.metrics.port))
        taken = None
        if start_worker and port and not port_is_free(port, settings.metrics.host):
            taken, port = port, free_port()
        child_env["EMOTION_STREAM_METRICS__PORT"] = str(port)
        proc = stack.enter_context(worker_process(child_env, log)) if start_worker else None
        if proc is not None and port:
            wait_ready(port, proc)
        yield Stack(kafka, proc, log, child_env, metrics_port=port, port_taken=taken)
