"""deploy/healthcheck.py, the image's HEALTHCHECK, against a small HTTP server standing in for a worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deploy import healthcheck
from tests.deploy.helpers import free_port

pytestmark = pytest.mark.unit

ANSWERS = {
    "/livez": (200, b'{"status":"ok"}'),
    "/readyz": (503, b'{"status":"fail","reason":"broker unreachable"}'),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def worker_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_live_worker_is_healthy(worker_port: int) -> None:
    assert healthcheck.check("/livez", worker_port) == (True, '200 {"status":"ok"}')


def test_an_answer_other_than_200_is_unhealthy_and_says_why(worker_port: int) -> None:
    healthy, said = healthcheck.check("/readyz", worker_port)
    assert not healthy and said.startswith("503") and "broker unreachable" in said


def test_nothing_listening_is_unhealthy() -> None:
    healthy, said = healthcheck.check("/livez", free_port())
    assert not healthy and "/livez" in said


def test_main_reads_the_port_from_the_worker_setting(
    worker_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMOTION_STREAM_METRICS__PORT", str(worker_port))
    assert healthcheck.main(["healthcheck.py"]) == 0
    assert healthcheck.main(["healthcheck.py", "/readyz"]) == 1
    assert "broker unreachable" in capsys.readouterr().out
