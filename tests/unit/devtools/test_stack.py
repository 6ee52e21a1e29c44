"""The stack helpers trust only their own worker: a port held by another process is not its answer."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stream_app.devtools.stack import listens_on, port_is_free, wait_ready
from stream_app.errors import InfrastructureError

pytestmark = pytest.mark.unit


class _ReadyWorker(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"emotion_assigned_partitions 4.0\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_worker() -> Iterator[int]:
    """A port in this process answering like a ready worker."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadyWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def test_port_is_free_and_who_listens(other_worker: int) -> None:
    assert not port_is_free(other_worker)
    assert listens_on(os.getpid(), other_worker)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            assert not listens_on(child.pid, other_worker)
        finally:
            child.kill()
    assert not listens_on(child.pid, other_worker)  # gone: not an error, just not listening


def test_wait_ready_believes_only_a_port_its_own_worker_listens_on(other_worker: int) -> None:
    wait_ready(other_worker, None, timeout_s=5)  # no process to check: any ready answer counts
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            with pytest.raises(InfrastructureError, match="not ready"):
                wait_ready(other_worker, child, timeout_s=1.5)  # another process answers: not ours
        finally:
            child.kill()
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]) as dead:
        dead.wait()
        with pytest.raises(InfrastructureError, match="exited with 3"):
            wait_ready(other_worker, dead, timeout_s=5)
