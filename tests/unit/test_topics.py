"""Topic admin without a broker: the report, and ``emotion-stream topics`` failing in one line, in time.

The command runs as a real subprocess, so anything it would print (a traceback, aiokafka's own log lines)
shows up in what is checked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.errors import InfrastructureError
from stream_app.settings import KafkaSettings
from stream_app.topics import TopicsReport, check_connection, fetch_partition_counts

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_the_report_names_what_was_created_and_what_differs() -> None:
    report = TopicsReport(8, created=("events",), existing={"input": 4, "dlq": 8})
    assert report.mismatched == {"input": 4}
    assert report.lines() == [
        "created events (8 partitions)",
        "exists  input (4 partitions, not 8: left unchanged)",
        "exists  dlq (8 partitions)",
    ]


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts TCP connections (kernel backlog) and never answers a Kafka request."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def refused() -> str:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _topics(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_STREAM_KAFKA__")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "topics", *args],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_no_bootstrap_servers() -> None:
    done, _ = _topics({})
    assert "set EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS" in _one_error_line(done)


def test_nothing_listening(refused: str) -> None:
    done, elapsed = _topics({"EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": refused})
    line = _one_error_line(done)
    assert f"cannot use Kafka at {refused} (PLAINTEXT)" in line
    assert "connection refused" in line
    assert elapsed < 20


def test_a_server_that_never_answers_is_given_up_on_after_the_timeout(silent_broker: str) -> None:
    done, elapsed = _topics({"EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": silent_broker}, "--timeout", "1.5")
    line = _one_error_line(done)
    assert f"no answer from Kafka at {silent_broker}" in line
    assert "within 1.5 s" in line
    assert 1.5 <= elapsed < 20  # interpreter start-up included


def test_the_timeout_setting_bounds_it_too(silent_broker: str) -> None:
    done, _ = _topics(
        {"EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": silent_broker, "EMOTION_STREAM_KAFKA__ADMIN_TIMEOUT_S": "1"}
    )
    assert "within 1 s" in _one_error_line(done)


def test_settings_that_cannot_work_are_one_line_too() -> None:
    done, _ = _topics(
        {"EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": "b:9093", "EMOTION_STREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}
    )
    line = _one_error_line(done)
    assert line.startswith(
        "Error: invalid settings: EMOTION_STREAM_KAFKA: security_protocol=SASL_SSL needs sasl_username"
    )


def test_an_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    done, _ = _topics(
        {
            "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9093",
            "EMOTION_STREAM_KAFKA__SECURITY_PROTOCOL": "SSL",
            "EMOTION_STREAM_KAFKA__SSL_CAFILE": str(tmp_path / "missing-ca.pem"),
        }
    )
    assert "ssl_cafile" in _one_error_line(done)


async def test_library_calls_raise_the_same_bounded_errors(silent_broker: str, refused: str) -> None:
    started = time.monotonic()
    with pytest.raises(InfrastructureError, match=r"within 0\.5 s"):
        await fetch_partition_counts(KafkaSettings(bootstrap_servers=silent_broker), ["t"], timeout_s=0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(InfrastructureError, match="connection refused"):
        await check_connection(refused, timeout_s=5)
