"""The worker's probes over a real broker: start-up, a worker without partitions, and the broker gone.

``/readyz`` and ``/livez`` are read as Kubernetes reads them (a plain GET every few hundred milliseconds),
and what they say is checked against what the worker's ``/metrics`` says at the same moment.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from stream_app.devtools.kafka_local import local_kafka
from tests.integration.conftest import make_topics
from tests.integration.worker_http import Answer, probe, samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NO_PARTITIONS = "no input partitions assigned"
MODEL_NOT_READY = ("starting", "model loading", "pipeline starting")


def _engine_loaded(values: dict[Any, float]) -> bool:
    return any(name == "emotion_engine_info" and v == 1 for (name, _), v in values.items())


def _assigned(values: dict[Any, float]) -> float:
    return values.get(("emotion_assigned_partitions", ()), 0.0)


def _check_fail_body(answer: Answer) -> None:
    assert answer.status == 503, answer
    assert answer.body["status"] == "fail", answer
    assert answer.reasons and all(answer.reasons), answer
    assert answer.body["reason"] == "; ".join(answer.reasons), answer


def _wait_ready(port: int, proc: Any, timeout_s: float = 120.0) -> Answer:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        answer = probe(port, "/readyz")
        if answer.status == 200:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"/readyz not 200 after {timeout_s:.0f} s: {probe(port, '/readyz')}")


def test_readyz_is_503_with_its_reason_until_the_model_and_partitions_are_there(kafka: Any, spawn_worker: Any) -> None:
    topics = make_topics(kafka, partitions=2)
    worker = spawn_worker(topics)
    port = worker.metrics_port
    seen: list[tuple[Answer, Answer, dict[Any, float]]] = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, worker.log_tail()
        ready = probe(port, "/readyz")
        live = probe(port, "/livez")
        if ready.status is None:  # the HTTP server is not up yet
            time.sleep(0.05)
            continue
        # /metrics read after /readyz: the probe judged a snapshot at most as new as these values
        seen.append((ready, live, samples(port)))
        if ready.status == 200:
            break
        time.sleep(0.1)
    assert seen and seen[-1][0].status == 200, f"never ready: {seen[-1:]}\n{worker.log_tail()}"
    loop_running = False
    for ready, live, values in seen:
        if ready.status == 200:
            assert ready.body == {"status": "ok"}
            assert _engine_loaded(values) and _assigned(values) > 0, values
            continue
        _check_fail_body(ready)
        if not _engine_loaded(values):  # loading is one way: it was loading when the snapshot was taken
            assert any(r.startswith(MODEL_NOT_READY) for r in ready.reasons), ready
        if _assigned(values) == 0:
            assert any(r.startswith(("starting", NO_PARTITIONS)) for r in ready.reasons), ready
        loop_running = loop_running or not ready.reasons[0].startswith("starting")
        if loop_running:  # from the event loop's first beat on, the worker is alive while it starts
            assert live.status == 200 and live.body == {"status": "ok"}, live
        else:
            _check_fail_body(live)
            assert live.reasons[0].startswith("starting"), live
    assert seen[0][0].status == 503, "ready at the first answer: nothing was checked"
    assert probe(port, "/livez").status == 200
    assert samples(port)[("emotion_ready", ())] == 1


def test_a_worker_without_partitions_is_alive_but_not_ready(kafka: Any, spawn_worker: Any) -> None:
    topics = make_topics(kafka, partitions=1)
    first = spawn_worker(topics, name="first")
    _wait_ready(first.metrics_port, first.process)
    second = spawn_worker(topics, name="second")
    port = second.metrics_port
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the model loaded and the group joined, with nothing to hold
        assert second.process.poll() is None, second.log_tail()
        answer = probe(port, "/readyz")
        if (
            answer.status == 503
            and answer.reasons == [r for r in answer.reasons if r.startswith(NO_PARTITIONS)]
            and _engine_loaded(samples(port))
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"second worker: {probe(port, '/readyz')}\n{second.log_tail()}")
    for _ in range(20):  # stays so: alive, not ready, one reason
        ready, live = probe(port, "/readyz"), probe(port, "/livez")
        _check_fail_body(ready)
        assert len(ready.reasons) == 1 and ready.reasons[0].startswith(NO_PARTITIONS), ready
        assert live.status == 200, live
        assert samples(port)[("emotion_ready", ())] == 0
        time.sleep(0.25)
    _wait_ready(first.metrics_port, first.process, timeout_s=60)  # the one with the partition is ready again


def test_readyz_turns_503_naming_the_broker_when_it_is_gone_while_livez_stays_200(
    cache_dir: Path, tmp_path: Path, spawn_worker: Any
) -> None:
    with local_kafka(cache_dir, tmp_path / "own-kafka") as own:
        topics = make_topics(own, partitions=1)
        worker = spawn_worker(
            topics,
            EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS=own.bootstrap_servers,
            EMOTION_STREAM_KAFKA__UNAVAILABLE_TIMEOUT_S="600",  # keep running cut off: readiness is the point
        )
        port = worker.metrics_port
        _wait_ready(port, worker.process)
        own.stop()
        stopped = time.monotonic()
        turned: Answer | None = None
        while time.monotonic() - stopped < 45:
            ready, live = probe(port, "/readyz"), probe(port, "/livez")
            assert live.status == 200, f"{live} {time.monotonic() - stopped:.1f} s after the broker stopped"
            if ready.status != 200:
                _check_fail_body(ready)
                if any(own.bootstrap_servers in r for r in ready.reasons):
                    turned = ready
                    break
            time.sleep(0.25)
        assert turned is not None, f"/readyz still {probe(port, '/readyz')}\n{worker.log_tail()}"
        took = turned.at - stopped
        assert took <= 22.0, f"/readyz turned 503 only {took:.1f} s after the broker stopped"
        assert any(r.startswith("no Kafka broker answered") for r in turned.reasons), turned
        for _ in range(8):  # cut off, but the loop and the inference threads are fine: not a restart case
            assert probe(port, "/livez").status == 200
            assert probe(port, "/readyz").status == 503
            time.sleep(0.25)
        assert samples(port)[("emotion_ready", ())] == 0
        assert worker.process.poll() is None, worker.log_tail()
