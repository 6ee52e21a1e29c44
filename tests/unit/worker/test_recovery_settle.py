"""Table recovery over changelogs that end in transaction markers (exactly-once output): a partition whose
consumer reached the end offset is settled, and when nothing else remains the recovery ends at once instead
of when Faust's changelog loop next times out (5 s, which stalled every partition at every rebalance)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.consumer.subscription_state import Assignment
from aiokafka.structs import TopicPartition
from faust.types import TP

from stream_app.worker.faust_glue import settle_transactional_recovery

pytestmark = pytest.mark.unit

CHANGELOG = "app-emotion-conversations-v1-changelog"


class FakeRecovery:
    """The part of Faust's Recovery the settling reads and ends (names as in faust.tables.recovery)."""

    def __init__(self, highwaters: dict[TP, int], offsets: dict[TP, int]) -> None:
        self.in_recovery = True
        self.active_highwaters = highwaters
        self.active_offsets: Counter[TP] = Counter(offsets)
        self.signal_recovery_end = asyncio.Event()
        self.flushed = 0

    def need_recovery(self) -> bool:
        return any(hw - self.active_offsets[tp] > 0 for tp, hw in self.active_highwaters.items())

    def flush_buffers(self) -> None:
        self.flushed += 1

    def _set_recovery_ended(self) -> None:
        self.in_recovery = False


def _app(recovery: FakeRecovery, positions: dict[TP, int]) -> Any:
    assignment = Assignment([TopicPartition(tp.topic, tp.partition) for tp in positions])
    for tp, position in positions.items():
        assignment.state_value(TopicPartition(tp.topic, tp.partition)).seek(position)
    consumer = SimpleNamespace(_subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment)))
    tables = SimpleNamespace(recovery=recovery, changelog_queue=asyncio.Queue())
    return SimpleNamespace(tables=tables, consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=consumer)))


def test_the_last_settled_partition_ends_the_recovery_at_once() -> None:
    async def run() -> None:
        a, b = TP(CHANGELOG, 0), TP(CHANGELOG, 1)
        # a: its last record (offset 9) applied, the commit marker at 10 never arrives; b: at its marker too
        recovery = FakeRecovery({a: 10, b: 5}, {a: 9, b: 4})
        app = _app(recovery, {a: 11, b: 6})
        quiet: dict[Any, int] = {}
        assert settle_transactional_recovery(app, quiet) == 0  # once: not yet (the queue may still fill)
        assert not recovery.signal_recovery_end.is_set()
        assert settle_transactional_recovery(app, quiet) == 2
        assert recovery.active_offsets[a] == 10 and recovery.active_offsets[b] == 5
        assert not recovery.in_recovery and recovery.flushed == 1
        assert recovery.signal_recovery_end.is_set()  # Faust's recovery waiter goes on now

    asyncio.run(run())


def test_the_recovery_goes_on_while_another_partition_still_has_records_to_read() -> None:
    async def run() -> None:
        a, b = TP(CHANGELOG, 0), TP(CHANGELOG, 1)
        recovery = FakeRecovery({a: 10, b: 50}, {a: 9, b: 20})
        app = _app(recovery, {a: 11, b: 21})  # b's consumer is far from its end
        quiet: dict[Any, int] = {}
        settle_transactional_recovery(app, quiet)
        assert settle_transactional_recovery(app, quiet) == 1
        assert recovery.in_recovery and not recovery.signal_recovery_end.is_set() and recovery.flushed == 0

    asyncio.run(run())
