"""The cache facade's sweep policy: expired, undecodable and surplus entries go; Faust's own keys stay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.cache.codec import CachedResult, encode
from stream_app.cache.tiered import SweepPlanner, plan_sweep

pytestmark = pytest.mark.unit


def _value(expires_at: float) -> bytes:
    return encode(CachedResult(0, np.array([0.9, 0.1], dtype=np.float32), expires_at))


def test_expired_undecodable_and_the_soonest_surplus_are_deleted() -> None:
    items = [
        (b"__faust\x00offset__", b"123"),
        (b"old", _value(50.0)),
        (b"junk", b"not a value"),
        (b"a", _value(300.0)),
        (b"b", _value(200.0)),
        (b"c", _value(400.0)),
    ]
    plan = plan_sweep(items, now=100.0, max_entries=2)
    assert sorted(plan.expired) == [b"junk", b"old"]
    assert plan.size == [b"b"]  # the soonest to expire of the three live ones
    assert plan.kept == 2


@settings(max_examples=100, deadline=None)
@given(
    expiries=st.lists(st.one_of(st.none(), st.floats(0, 200)), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    max_entries=st.integers(1, 40),
)
def test_a_sweep_fed_in_slices_plans_what_one_pass_plans(
    expiries: list[float | None], cuts: list[int], max_entries: int
) -> None:
    """The worker feeds the planner a slice at a time, yielding to its loop between slices."""
    items = [(f"k{i}".encode(), b"junk" if e is None else _value(e)) for i, e in enumerate(expiries)]
    planner = SweepPlanner(now=100.0, max_entries=max_entries)
    start = 0
    for cut in sorted({*cuts, len(items)}):
        planner.add(items[start:cut])
        start = max(start, cut)
    sliced, whole = planner.plan(), plan_sweep(items, now=100.0, max_entries=max_entries)
    assert (sorted(sliced.expired), sorted(sliced.size), sliced.kept) == (
        sorted(whole.expired),
        sorted(whole.size),
        whole.kept,
    )
