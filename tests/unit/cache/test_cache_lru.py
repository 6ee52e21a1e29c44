"""L1: TTL expiry on an injected clock and LRU eviction order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.cache.lru import TtlLru

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def make(max_entries: int = 3, ttl_s: float = 10.0) -> tuple[TtlLru[str, int], FakeClock]:
    clock = FakeClock()
    return TtlLru(max_entries=max_entries, ttl_s=ttl_s, clock=clock), clock


def test_hit_and_miss() -> None:
    lru, _ = make()
    assert lru.get("a") is None
    lru.put("a", 1)
    assert lru.get("a") == 1
    assert (lru.hits, lru.misses) == (1, 1)


def test_entry_expires_after_ttl_and_is_removed_on_access() -> None:
    lru, clock = make(ttl_s=10.0)
    lru.put("a", 1)
    clock.now += 9.999
    assert lru.get("a") == 1
    clock.now += 0.001
    assert lru.get("a") is None
    assert lru.expirations == 1
    assert len(lru) == 0


def test_get_refreshes_recency_but_not_expiry() -> None:
    lru, clock = make(max_entries=2, ttl_s=10.0)
    lru.put("a", 1)
    clock.now += 6
    assert lru.get("a") == 1  # touched: now most recent, but still expires at +10
    clock.now += 5
    assert lru.get("a") is None


def test_put_replaces_value_and_expiry() -> None:
    lru, clock = make(ttl_s=10.0)
    lru.put("a", 1)
    clock.now += 8
    lru.put("a", 2)
    clock.now += 8
    assert lru.get("a") == 2
    assert len(lru) == 1


def test_per_entry_ttl() -> None:
    lru, clock = make(ttl_s=10.0)
    lru.put("short", 1, ttl_s=1.0)
    lru.put("long", 2)
    clock.now += 2
    assert lru.get("short") is None
    assert lru.get("long") == 2


def test_lru_eviction_order() -> None:
    lru, _ = make(max_entries=3)
    for i, k in enumerate("abc"):
        lru.put(k, i)
    assert lru.get("a") == 0  # a becomes most recent; b is now least recent
    lru.put("d", 3)
    assert lru.evictions == 1
    assert lru.get("b") is None
    lru.put("e", 4)  # evicts c, the least recent of a, c, d
    assert lru.get("c") is None
    assert [lru.get(k) for k in "ade"] == [0, 3, 4]
    assert len(lru) == 3


def test_sweep_removes_only_expired() -> None:
    lru, clock = make(max_entries=10, ttl_s=10.0)
    lru.put("old", 1)
    clock.now += 5
    lru.put("new", 2)
    clock.now += 6
    assert lru.sweep() == 1
    assert len(lru) == 1
    assert lru.get("new") == 2
    assert lru.expirations == 1


def test_pop_and_clear() -> None:
    lru, _ = make()
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.pop("a") == 1
    assert lru.pop("a") is None
    lru.clear()
    assert len(lru) == 0


@pytest.mark.parametrize(("max_entries", "ttl_s"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_bounds(max_entries: int, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TtlLru(max_entries=max_entries, ttl_s=ttl_s)


@settings(deadline=None)  # a shared, loaded CI box must not turn slowness into failures
@given(
    ops=st.lists(st.tuples(st.sampled_from(["get", "put", "tick"]), st.integers(0, 7), st.floats(0, 4)), max_size=80)
)
def test_matches_a_reference_model(ops: list[tuple[str, int, float]]) -> None:
    """Against a naive list-based model: same answers, never over the bound."""
    lru, clock = make(max_entries=4, ttl_s=5.0)
    model: list[tuple[int, int, float]] = []  # (key, value, expires_at), least recent first
    for op, key, x in ops:
        if op == "tick":
            clock.now += x
        elif op == "put":
            model = [e for e in model if e[0] != key] + [(key, int(x * 100), clock.now + 5.0)]
            model = model[-4:]
            lru.put(str(key), int(x * 100))
        else:
            found = [e for e in model if e[0] == key]
            expected = None
            if found:
                model.remove(found[0])
                if clock.now < found[0][2]:
                    expected = found[0][1]
                    model.append(found[0])
            assert lru.get(str(key)) == expected
        assert len(lru) <= 4
