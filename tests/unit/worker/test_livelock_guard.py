"""The glue's consumer thread under Faust's livelock detector: a partition without a position (just assigned,
or being reset to its log start) is skipped instead of crashing the worker on aiokafka's assertion."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.consumer.subscription_state import Assignment
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream_app.worker.faust_glue import EmotionConsumerThread

pytestmark = pytest.mark.unit

TOPIC = "chat.messages.v1"


def _thread(cls: type[Any], assignment: Assignment, now: float) -> Any:
    """A consumer thread with just what the detector reads: a just-started, healthy worker whose every
    partition was polled a moment ago and whose stream took a record a moment ago."""
    thread = cls.__new__(cls)
    thread._consumer = SimpleNamespace(
        _subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment)),
        _fetcher=SimpleNamespace(_subscriptions=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))),
    )
    thread._ensure_consumer = lambda: thread._consumer
    thread.time_started = now
    thread.tp_fetch_request_timeout_secs = 60.0
    thread.tp_stream_timeout_secs = 60.0
    thread.tp_commit_timeout_secs = 60.0
    thread.tp_last_committed_at = {}
    inbound = {TP(TOPIC, p): now for p in range(2)}
    app = SimpleNamespace(monitor=SimpleNamespace(stream_inbound_time=inbound),
                          topics=SimpleNamespace(acks_enabled_for=lambda topic: True))  # fmt: skip
    thread.consumer = SimpleNamespace(app=app)
    return thread


def _assignment(now: float) -> Assignment:
    """Partition 0 at offset 5; partition 1 awaiting its offset reset (no position)."""
    tps = [TopicPartition(TOPIC, p) for p in range(2)]
    assignment = Assignment(tps)
    for tp in tps:
        state = assignment.state_value(tp)
        state.timestamp = now * 1000
        state.highwater = 10
    assignment.state_value(tps[0]).seek(5)
    assignment.state_value(tps[1]).await_reset(0)
    return assignment


def test_a_partition_without_a_position_is_skipped_not_a_crash() -> None:
    async def run() -> None:
        now = time.monotonic()
        assignment = _assignment(now)
        # Faust's own thread crashes here (the worker died this way after a post-rebalance seek)
        with pytest.raises(AssertionError):
            _thread(faust_aiokafka.AIOKafkaConsumerThread, assignment, now).verify_event_path(now, TP(TOPIC, 1))
        thread = _thread(EmotionConsumerThread, assignment, now)
        assert thread.verify_event_path(now, TP(TOPIC, 1)) is None
        # a partition with a position still goes through Faust's checks (which read its position)
        read: list[int] = []
        state = assignment.state_value(TopicPartition(TOPIC, 0))
        original = type(state).position

        class Watched(type(state)):  # type: ignore[misc]
            @property
            def position(self) -> int:
                value: int = original.fget(self)
                read.append(value)
                return value

        state.__class__ = Watched
        thread.verify_event_path(now, TP(TOPIC, 0))
        assert read == [5]

    asyncio.run(run())
