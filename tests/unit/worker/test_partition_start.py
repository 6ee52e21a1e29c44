"""Where a newly assigned partition's processing begins (``plan_start``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.worker.app import plan_start

pytestmark = pytest.mark.unit


def test_the_committed_offset_when_the_group_has_one() -> None:
    assert plan_start(120, 0) == 120
    assert plan_start(0, 0) == 0  # aiokafka does not seek to 0: the worker must know it is the start


def test_the_log_start_without_a_committed_offset() -> None:
    """auto.offset.reset=earliest: a partition never committed starts at its first record, so records a
    rebalance fetched and dropped before the partition was ready are read again."""
    assert plan_start(None, 0) == 0
    assert plan_start(None, 350) == 350


def test_the_log_start_when_retention_deleted_the_committed_offset() -> None:
    assert plan_start(10, 400) == 400


def test_unknown_without_either() -> None:
    assert plan_start(None, None) is None
    assert plan_start(42, None) == 42


@given(st.one_of(st.none(), st.integers(0, 10**12)), st.one_of(st.none(), st.integers(0, 10**12)))
def test_never_before_the_log_start_nor_the_committed_offset(committed: int | None, start: int | None) -> None:
    planned = plan_start(committed, start)
    if start is not None:
        assert planned is not None and planned >= start
    if committed is not None:
        assert planned is not None and planned >= committed


def test_the_consumer_thread_seeks_every_partition_through_the_glue() -> None:
    """Faust's seek after a rebalance runs the glue's seek (committed offset, else auto.offset.reset) in the
    consumer thread, not aiokafka's, which leaves a partition without a committed offset where it was."""
    import asyncio

    from stream_app.worker import faust_glue

    calls: list[tuple[object, tuple[object, ...]]] = []
    consumer = object()
    thread = object.__new__(faust_glue.EmotionConsumerThread)
    owner = object.__new__(faust_glue.EmotionConsumer)
    owner.__dict__["chunk_topics"] = frozenset({"chat"})

    async def call_thread(fn: object, *args: object) -> dict[object, int]:
        calls.append((fn, args))
        return {}

    thread.__dict__.update(_ensure_consumer=lambda: consumer, call_thread=call_thread, consumer=owner)
    assert asyncio.run(thread.seek_to_committed()) == {}
    assert calls == [(faust_glue.seek_to_committed_or_reset, (consumer, frozenset({"chat"})))]
