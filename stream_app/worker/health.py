"""The worker's HTTP port: ``/metrics``, ``/livez``, ``/readyz`` (and routes added by other parts).

A threaded WSGI server (the standard library's, as prometheus-client's own) so that a busy or blocked
event loop cannot hold a probe's answer back: the loop publishes a :class:`Health` snapshot every
``interval`` and the server judges it.

* ``/livez``: 200 while the event loop's heartbeat is fresh and the inference threads make progress
  (work queued and no batch finished for ``stall_s`` is a stall); else 503 with the reason.
* ``/readyz``: 200 once the engine is loaded, warmed and past its parity gate, the group is joined with
  input partitions assigned, table recovery is done and a broker answered recently; else 503 with every
  reason that holds.

Both answer JSON: ``{"status": "ok"}`` or ``{"status": "fail", "reasons": [...]}``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from stream_app.metrics import Metrics

__all__ = ["Health", "HealthServer", "Route"]

Route = Callable[[re.Match[str], dict[str, Any]], tuple[int, dict[str, Any]]]
"""``route(match, environ) -> (status, json_body)`` for an extra path (e.g. ``/conversations/{id}``)."""

_STATUS = {200: "200 OK", 404: "404 Not Found", 502: "502 Bad Gateway", 503: "503 Service Unavailable"}


@dataclass
class Health:
    """What the probes judge; written by the event loop, read by the HTTP threads.

    Attributes:
        heartbeat: Monotonic time of the loop's last beat.
        not_ready: Reasons the worker is not ready (empty: ready).
        inference_queued: Messages waiting for or in inference.
        last_inference: Monotonic time the engine last finished a batch (or the worker started).
        stall_s: Queued work with no finished batch for this long is a stall (liveness fails).
        heartbeat_s: A heartbeat older than this fails liveness.
    """

    heartbeat: float = field(default_factory=time.monotonic)
    not_ready: list[str] = field(default_factory=lambda: ["starting"])
    inference_queued: int = 0
    last_inference: float = field(default_factory=time.monotonic)
    stall_s: float = 120.0
    heartbeat_s: float = 10.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, *, not_ready: Iterable[str], inference_queued: int, last_inference: float) -> None:
        with self.lock:
            self.heartbeat = time.monotonic()
            self.not_ready = list(not_ready)
            self.inference_queued = inference_queued
            self.last_inference = last_inference

    def liveness(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self.lock:
            reasons = []
            if now - self.heartbeat > self.heartbeat_s:
                reasons.append(f"event loop has not beaten for {now - self.heartbeat:.1f} s")
            if self.inference_queued and now - self.last_inference > self.stall_s:
                reasons.append(
                    f"{self.inference_queued} message(s) wait for inference and no batch finished for "
                    f"{now - self.last_inference:.0f} s"
                )
            return reasons

    def readiness(self, now: float | None = None) -> list[str]:
        with self.lock:
            reasons = list(self.not_ready)
        return reasons + self.liveness(now)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HealthServer:
    """Serve metrics, probes and extra routes on ``host:port`` from a daemon thread.

    Args:
        metrics: The registry served at ``/metrics``.
        health: The snapshot the probes judge.
        host, port: Where to listen (port 0: any free port; see :attr:`port`).
    """

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        self.health = health
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._routes: list[tuple[re.Pattern[str], Route]] = []
        self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def add_route(self, pattern: str, route: Route) -> None:
        """Answer GET requests whose path matches ``pattern`` (a full-match regular expression)."""
        self._routes.append((re.compile(pattern), route))

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics" or path.startswith("/metrics?"):
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/livez":
            return self._probe(self.health.liveness(), start_response)
        if path == "/readyz":
            return self._probe(self.health.readiness(), start_response)
        for pattern, route in self._routes:
            match = pattern.fullmatch(path)
            if match is not None:
                status, body = route(match, environ)
                return _json(status, body, start_response)
        return _json(404, {"status": "fail", "reasons": [f"no such path: {path}"]}, start_response)

    @staticmethod
    def _probe(reasons: list[str], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if reasons:
            return _json(503, {"status": "fail", "reasons": reasons}, start_response)
        return _json(200, {"status": "ok"}, start_response)


def _json(status: int, body: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(
        _STATUS.get(status, f"{status} Error"),
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]
