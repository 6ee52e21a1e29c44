"""Exactly-once output in the core: one transaction per partition and flush, offsets inside it, isolation of a
refused record, and a failed commit that leaves nothing committed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from stream_app.core.slots import OutRecord
from stream_app.errors import OutputRejectedError
from tests.unit.core.fakes import ListSink, Rec, build, raw

pytestmark = pytest.mark.unit


@dataclass
class FakeTransactions:
    """Records begin/send/commit/abort per partition; what a read_committed consumer would see is ``visible``."""

    reject_when: Any = None
    fail_commit: bool = False
    log: list[tuple[str, int]] = field(default_factory=list)
    open: dict[int, list[tuple[str, OutRecord]]] = field(default_factory=dict)
    visible: list[tuple[str, OutRecord]] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=dict)
    commit_delay_s: float = 0.0
    closed: set[int] = field(default_factory=set)  # the worker closed these partitions' producers

    async def begin(self, partition: int) -> None:
        assert partition not in self.open, "a transaction is already open"
        self.open[partition] = []
        self.log.append(("begin", partition))

    async def send(
        self, partition: int, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        if self.reject_when is not None and any(self.reject_when(topic, r) for r in records):
            fut.set_exception(OutputRejectedError("too large"))
        else:
            self.open[partition].extend((topic, r) for r in records)
            fut.set_result(0)
        return [(list(range(len(records))), fut)]

    async def commit(self, partition: int, offset: int | None) -> None:
        self.log.append(("commit", partition))
        await asyncio.sleep(self.commit_delay_s)
        if partition in self.closed:
            raise RuntimeError(f"no transactional producer for partition {partition}")
        if self.fail_commit:
            raise RuntimeError("ProducerFenced")
        self.visible.extend(self.open.pop(partition))
        if offset is not None:
            self.committed[partition] = offset

    async def abort(self, partition: int) -> None:
        self.log.append(("abort", partition))
        self.open.pop(partition, None)

    def docs(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(r.value or b"null") for t, r in self.visible if t == topic]


async def _until(condition: Any, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


def _pipeline(txn: FakeTransactions, fatal: list[BaseException] | None = None) -> Any:
    p = build(ListSink(), fatal=fatal)
    p.emitter.transactions = txn
    return p


async def test_each_partition_commits_its_outputs_and_offsets_together() -> None:
    txn = FakeTransactions()
    p = _pipeline(txn)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"text {i}")) for i in range(5)], 1: [Rec(0, b"{bad")]})
        assert await p.drain(5)
    finally:
        await p.stop()
    assert sorted(d["source"]["offset"] for d in txn.docs("events")) == list(range(5))
    assert [d["source"]["partition"] for d in txn.docs("dlq")] == [1]
    assert txn.committed == {0: 5, 1: 1}
    assert p.committable() == {}  # nothing left for the plain commit path
    assert not txn.open


async def test_a_refused_record_is_isolated_and_its_neighbours_commit() -> None:
    txn = FakeTransactions(reject_when=lambda topic, r: topic == "events" and b'"m2"' in (r.value or b""))
    p = _pipeline(txn)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"text {i}")) for i in range(4)]})
        assert await p.drain(5)
    finally:
        await p.stop()
    assert sorted(d["source"]["offset"] for d in txn.docs("events")) == [0, 1, 3]
    assert [(d["reason"], d["source"]["offset"]) for d in txn.docs("dlq")] == [("output_failed", 2)]
    assert ("abort", 0) in txn.log
    assert txn.committed == {0: 4}


async def test_a_failed_commit_is_fatal_and_nothing_becomes_visible() -> None:
    txn = FakeTransactions(fail_commit=True)
    fatal: list[BaseException] = []
    p = _pipeline(txn, fatal)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"text {i}")) for i in range(3)]})
        await _until(lambda: fatal)
    finally:
        await p.stop()
    assert fatal and "transaction of partition 0 failed" in str(fatal[0])
    assert txn.visible == [] and txn.committed == {}
    assert p.committable() == {}


async def _a_transaction_of_stage_records_only(p: Any, txn: FakeTransactions) -> None:
    """Partition 0's slots all committed, then a transaction carrying only a stage-metrics record."""
    await p.start()
    await p.feed("in", {0: [Rec(o, raw(o, f"t {o}")) for o in range(3)]})
    assert await p.drain(5.0)
    txn.commit_delay_s = 0.3
    p.emitter._metrics_outbox.append(OutRecord(None, b"{}", []))
    p.emitter.request_flush()
    await asyncio.sleep(0.05)
    assert txn.log[-1] == ("commit", 0)  # in flight


async def test_revocation_waits_for_a_transaction_in_flight_before_the_producer_closes() -> None:
    """The worker closes a revoked partition's producer once revoke() returns: a transaction still in flight
    (stage records only, every slot acknowledged) must have finished by then."""
    txn = FakeTransactions()
    fatal: list[BaseException] = []
    p = _pipeline(txn, fatal)
    try:
        await _a_transaction_of_stage_records_only(p, txn)
        await p.revoke([0], timeout_s=2.0)
        txn.closed.add(0)  # what the worker does next
        await asyncio.sleep(0.4)
        assert not fatal and p.failed is None
        assert {} in txn.docs("metrics")  # committed before the producer closed
    finally:
        await p.stop()


async def test_a_transaction_outliving_the_revocation_is_aborted_not_fatal() -> None:
    txn = FakeTransactions()
    fatal: list[BaseException] = []
    p = _pipeline(txn, fatal)
    try:
        await _a_transaction_of_stage_records_only(p, txn)
        await p.revoke([0], timeout_s=0.05)  # gives up waiting
        txn.closed.add(0)
        await asyncio.sleep(0.4)
        assert not fatal and p.failed is None
        assert {} not in txn.docs("metrics")
    finally:
        await p.stop()


async def test_a_transaction_failing_while_its_partition_is_revoked_is_abandoned_not_fatal() -> None:
    """A worker paused past its session resumes into a revocation; its producer, fenced by the new owner,
    fails the transaction in flight. The partition is leaving: nothing is committed, its next owner reads
    the records again, and this worker goes on (it had exited 1 with the producer's error)."""
    txn = FakeTransactions(fail_commit=True, commit_delay_s=0.2)
    fatal: list[BaseException] = []
    p = _pipeline(txn, fatal)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(i, raw(i, f"text {i}")) for i in range(3)]})
        await _until(lambda: ("commit", 0) in txn.log)
        assert ("commit", 0) in txn.log  # in flight
        assert await p.revoke([0], timeout_s=2.0) == {}
        await asyncio.sleep(0.3)
        assert not fatal and p.failed is None
        assert txn.visible == [] and txn.committed == {}
        assert p.in_flight == 0  # the abandoned records hold no space (backpressure would count them)
        assert 0 not in p.emitter.lanes
    finally:
        await p.stop()
