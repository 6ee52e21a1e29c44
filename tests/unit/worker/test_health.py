"""The probe snapshot's judgement (injected times) and the HTTP answers of the health server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from stream_app.metrics import Metrics
from stream_app.worker.health import Health, HealthServer

pytestmark = pytest.mark.unit


def test_before_the_event_loop_first_beats_the_worker_is_starting_not_live_and_not_ready() -> None:
    health = Health(created=100.0)
    live = health.liveness(now=103.5)
    assert len(live) == 1 and live[0].startswith("starting") and "3.5 s after start" in live[0]
    assert health.readiness(now=103.5) == live
    health.update(not_ready=["model loading"], inference_queued=0, last_inference=104.0, now=104.0)
    assert health.liveness(now=104.5) == []
    assert health.readiness(now=104.5) == ["model loading"]


def test_a_silent_event_loop_fails_liveness_and_readiness() -> None:
    health = Health(heartbeat_s=10.0)
    health.update(not_ready=[], inference_queued=0, last_inference=0.0, now=50.0)
    assert health.liveness(now=59.9) == [] and health.readiness(now=59.9) == []
    assert health.liveness(now=61.0) == ["event loop has not beaten for 11.0 s"]
    assert health.readiness(now=61.0) == ["event loop has not beaten for 11.0 s"]


def test_a_stall_counts_from_when_work_started_waiting_not_from_the_last_batch_of_an_idle_worker() -> None:
    health = Health(stall_s=120.0)
    # idle for an hour: the last batch finished at t=0, nothing waits
    health.update(not_ready=[], inference_queued=0, last_inference=0.0, now=3600.0)
    # a message arrives: it waits, but not for an hour
    health.update(not_ready=[], inference_queued=1, last_inference=0.0, now=3601.0)
    assert health.liveness(now=3601.5) == []
    for t in range(3602, 3721, 5):  # still waiting, the loop beating, no batch finishing
        health.update(not_ready=[], inference_queued=1, last_inference=0.0, now=float(t))
    assert health.liveness(now=3720.5) == []
    health.update(not_ready=[], inference_queued=3, last_inference=0.0, now=3722.0)
    assert health.liveness(now=3722.0) == ["3 message(s) wait for inference and no batch finished for 121 s"]
    # a batch finishes: progress again, though work keeps waiting (a backlog)
    health.update(not_ready=[], inference_queued=3, last_inference=3723.0, now=3723.0)
    assert health.liveness(now=3724.0) == []
    # the queue empties, then fills again much later: a fresh wait
    health.update(not_ready=[], inference_queued=0, last_inference=3723.0, now=3730.0)
    health.update(not_ready=[], inference_queued=2, last_inference=3723.0, now=9000.0)
    assert health.liveness(now=9000.5) == []


def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_the_server_answers_json_with_one_line_reason_and_the_list() -> None:
    health = Health()
    server = HealthServer(Metrics(), health, "127.0.0.1", 0).start()
    try:
        status, body = _get(server.port, "/livez")
        assert status == 503 and body["status"] == "fail" and str(body["reason"]).startswith("starting")
        health.update(not_ready=["model loading", "no input partitions assigned"], inference_queued=0,
                      last_inference=0.0)  # fmt: skip
        assert _get(server.port, "/livez") == (200, {"status": "ok"})
        assert _get(server.port, "/readyz") == (
            503,
            {
                "status": "fail",
                "reason": "model loading; no input partitions assigned",
                "reasons": ["model loading", "no input partitions assigned"],
            },
        )
        health.update(not_ready=[], inference_queued=0, last_inference=0.0)
        assert _get(server.port, "/readyz") == (200, {"status": "ok"})
        assert _get(server.port, "/healthz")[0] == 404
    finally:
        server.stop()
