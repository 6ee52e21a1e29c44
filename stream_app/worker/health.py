"""The worker's HTTP port: ``/metrics``, ``/livez``, ``/readyz`` (and routes added by other parts).

A threaded WSGI server (the standard library's, as prometheus-client's own) so that a busy or blocked
event loop cannot hold a probe's answer back: the loop publishes a :class:`Health` snapshot every
``interval`` and the server judges it.

* ``/livez``: 200 while the event loop's heartbeat is fresh and the inference threads make progress
  (work waiting for inference for ``stall_s`` with no batch finishing meanwhile is a stall); else 503
  with the reason. Until the event loop's first beat it answers 503 ("starting"): the process is still
  importing, checking the cluster or starting Faust, and a Kubernetes startup probe on ``/livez`` waits
  for exactly that (a liveness probe only starts after it).
* ``/readyz``: 200 once the engine is loaded, warmed and past its parity gate, the group is joined with
  input partitions assigned, table recovery is done and a broker answered recently; else 503 with every
  reason that holds (a failing liveness is a reason too).

Both answer JSON: ``{"status": "ok"}`` or ``{"status": "fail", "reason": "a; b", "reasons": ["a", "b"]}``
(``reason``, one line, for people and the Docker health check; ``reasons``, a list, for programs).
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
        heartbeat: Monotonic time of the loop's last beat (None until its first).
        not_ready: Reasons the worker is not ready, as the event loop last found them (before its first
            beat, liveness's "starting" is the reason).
        inference_queued: Messages waiting for or in inference.
        last_inference: Monotonic time the engine last finished a batch (or the worker started).
        busy_since: Monotonic time since when work has been waiting for inference without a pause (None
            while none waits). A stall is measured from the later of this and ``last_inference``: after an
            idle hour, the first message is not a stall because no batch finished during that hour.
        stall_s: Work waiting for inference this long with no batch finishing is a stall (liveness fails).
        heartbeat_s: A heartbeat older than this fails liveness.
        created: Monotonic time this snapshot was made (the process's start, near enough).
    """

    heartbeat: float | None = None
    not_ready: list[str] = field(default_factory=list)
    inference_queued: int = 0
    last_inference: float = field(default_factory=time.monotonic)
    busy_since: float | None = None
    stall_s: float = 120.0
    heartbeat_s: float = 10.0
    created: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(
        self, *, not_ready: Iterable[str], inference_queued: int, last_inference: float, now: float | None = None
    ) -> None:
        """One beat of the event loop: what it found (called about once a second)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self.heartbeat = now
            self.not_ready = list(not_ready)
            if not inference_queued:
                self.busy_since = None
            elif self.busy_since is None:
                self.busy_since = now
            self.inference_queued = inference_queued
            self.last_inference = last_inference

    def liveness(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self.lock:
            reasons = []
            if self.heartbeat is None:
                return [
                    "starting: checking the cluster and topics, starting Faust and loading the model (the event "
                    f"loop has not run yet, {now - self.created:.1f} s after start)"
                ]
            if now - self.heartbeat > self.heartbeat_s:
                reasons.append(f"event loop has not beaten for {now - self.heartbeat:.1f} s")
            if self.inference_queued and self.busy_since is not None:
                waiting = now - max(self.last_inference, self.busy_since)
                if waiting > self.stall_s:
                    reasons.append(
                        f"{self.inference_queued} message(s) wait for inference and no batch finished for "
                        f"{waiting:.0f} s"
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

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        # the path as sent, still percent-encoded (PATH_INFO is decoded: an id holding %2F would split)
        environ["RAW_PATH"] = self.path.split("?", 1)[0]
        return environ


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
        """Answer GET requests whose path, as sent (percent-encoded), matches ``pattern`` (a full-match
        regular expression)."""
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
        raw_path = environ.get("RAW_PATH", path)
        for pattern, route in self._routes:
            match = pattern.fullmatch(raw_path)
            if match is not None:
                status, body = route(match, environ)
                return _json(status, body, start_response)
        why = f"no such path: {path}"
        return _json(404, {"status": "fail", "reason": why, "reasons": [why]}, start_response)

    @staticmethod
    def _probe(reasons: list[str], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if reasons:
            return _json(503, {"status": "fail", "reason": "; ".join(reasons), "reasons": reasons}, start_response)
        return _json(200, {"status": "ok"}, start_response)


def _json(status: int, body: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(
        _STATUS.get(status, f"{status} Error"),
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]
