"""The cache facade's sweep policy: expired, undecodable and surplus entries go; Faust's own keys stay."""

from __future__ import annotations

import numpy as np
import pytest

from stream_app.cache.codec import CachedResult, encode
from stream_app.cache.tiered import plan_sweep

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
