"""``emotion-stream demo`` as a user runs it (a subprocess, Ctrl-C as SIGINT), against the session's broker.

Another worker already on the demo's metrics port, the demo's own worker dying, and Ctrl-C pressed twice:
the demo talks only to its own worker, says at once when it died (with its log's tail, and keeps the log),
and never leaves it running behind.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stream_app.devtools.kafka_local import free_port
from tests.integration.conftest import make_topics
from tests.integration.worker_http import samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Demo:
    """A running ``emotion-stream demo`` whose output is read line by line as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def close(self) -> None:
        """After the process ended: read the rest of its output and close the pipe."""
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 180.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output)
            if m is not None:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the demo's output (exit {self.proc.poll()}):\n{self.output}")

    def worker_pid(self) -> int:
        return int(self.wait_for(r"worker\s+pid (\d+)").group(1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def demo(kafka: Any, model_path: str) -> Iterator[Any]:
    """``demo(*args, port=...)`` -> a started :class:`Demo` on the session broker (no Kafka of its own)."""
    started: list[Demo] = []

    def start(*args: str, port: int | None = None) -> Demo:
        topics = make_topics(kafka, partitions=2)
        env = {
            **os.environ,
            **topics.env(),
            "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S": "6",
            "EMOTION_STREAM_WORKER__APP_ID": f"emotion-demo-{uuid.uuid4().hex[:8]}",
            "EMOTION_STREAM_MODEL__PATH": model_path,
            "EMOTION_STREAM_MODEL__NUM_THREADS": "1",
            "EMOTION_STREAM_METRICS__PORT": str(port if port is not None else free_port()),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "demo", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(Demo(proc))
        return started[-1]

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
        d.close()
        for pid in re.findall(r"worker\s+pid (\d+)", d.output):  # never leave a worker behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)


class _OtherWorker(http.server.BaseHTTPRequestHandler):
    """Answers like a ready worker that holds partitions: what the demo once took for its own."""

    def do_GET(self) -> None:
        body = b"emotion_assigned_partitions 4.0\nemotion_ready 1.0\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_worker_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtherWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def test_with_another_worker_on_its_port_the_demo_runs_its_own_on_a_free_one(demo: Any, other_worker_port: int) -> None:
    d = demo("--messages", "40", "--rate", "0", "--malformed", "0.1", port=other_worker_port)
    assert d.proc.wait(timeout=300) == 0, d.output
    out = d.output
    assert f"port {other_worker_port} is taken" in out
    port = int(re.search(r"metrics :(\d+)/metrics", out).group(1))  # type: ignore[union-attr]
    assert port != other_worker_port
    events = int(re.search(r"events\s*\S\s*(\d+)", out.split("demo summary", 1)[1]).group(1))  # type: ignore[union-attr]
    missing = int(re.search(r"missing\s*\S\s*(\d+)", out).group(1))  # type: ignore[union-attr]
    assert events > 0 and missing == 0, out


def test_the_demo_reports_its_workers_death_at_once_with_the_log_tail_and_keeps_the_log(demo: Any) -> None:
    d = demo("--messages", "100000", "--rate", "5")
    pid = d.worker_pid()
    time.sleep(2)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = d.proc.wait(timeout=60)
    took = time.monotonic() - killed
    out = d.output
    assert code == 1, out
    assert took < 10, f"the demo noticed its worker's death after {took:.0f} s"
    assert "the demo's worker exited with -9" in out
    assert "last lines of the worker's log" in out
    kept = Path(re.search(r"full log is kept at (\S+\.log)", out).group(1))  # type: ignore[union-attr]
    try:
        log = kept.read_text()
        assert "metrics and probes on" in log  # the worker's whole log, from its start
        last = [line for line in log.splitlines() if " INFO " in line or " WARNING " in line][-1]
        assert last in out  # and its tail on the screen
    finally:
        kept.unlink(missing_ok=True)


def test_ctrl_c_twice_stops_the_worker_instead_of_orphaning_it(demo: Any) -> None:
    d = demo("--messages", "100000", "--rate", "20")
    pid = d.worker_pid()
    port = int(d.wait_for(r"metrics :(\d+)/metrics").group(1))
    deadline = time.monotonic() + 60
    while samples(port).get(("emotion_events_total", ()), 0) < 20:  # events flow
        assert time.monotonic() < deadline, d.output
        time.sleep(0.2)
    d.proc.send_signal(signal.SIGINT)
    d.wait_for("interrupted: stopping the worker", timeout_s=30)
    # a worker slow to stop (a long drain, a broker that does not answer its last commit): frozen here, so
    # the orderly stop (SIGTERM, then up to 30 s) cannot end by itself while we press Ctrl-C again
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    assert _alive(pid)
    pressed = time.monotonic()
    d.proc.send_signal(signal.SIGINT)  # impatient: Ctrl-C again
    d.proc.wait(timeout=60)
    assert time.monotonic() - pressed < 10, "the second Ctrl-C did not cut the stop short"
    deadline = time.monotonic() + 1.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"worker {pid} outlived the demo:\n{d.output}"
