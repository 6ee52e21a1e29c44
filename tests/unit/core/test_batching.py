"""The batcher: property tests on a fake clock, the asyncio wrapper, and the adaptive token budget."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.core.batching import (
    AdaptiveBudget,
    Batch,
    Batcher,
    QueueFull,
)
from stream_app.errors import ConfigError

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Msg:
    key: str
    seq: int


# -- the synchronous core, driven as an event simulation ------------------------------------------


@dataclass(frozen=True)
class Config:
    max_batch_size: int
    max_batch_tokens: int
    max_wait_s: float
    group_by_length: bool


configs = st.builds(
    Config,
    max_batch_size=st.integers(1, 12),
    max_batch_tokens=st.integers(1, 300),
    max_wait_s=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.3, 1.0]),
    group_by_length=st.booleans(),
)
# (gap since the previous arrival, key, token count); token counts run past the budget on purpose.
arrivals = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.0005, 0.003, 0.02, 0.1, 0.7]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(1, 400),
    ),
    max_size=120,
)


def simulate(cfg: Config, stream: list[tuple[float, str, int]]) -> tuple[list[Batch[Msg]], dict[int, float]]:
    """Feed arrivals on a fake clock; take() whenever ready() says so, stepping the clock through every
    deadline before the next arrival (what AsyncBatcher does). Returns the batches and arrival times."""
    clock = FakeClock()
    b: Batcher[Msg] = Batcher(
        max_batch_size=cfg.max_batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        max_wait_s=cfg.max_wait_s,
        capacity=10_000,
        group_by_length=cfg.group_by_length,
        clock=clock,
    )
    out: list[Batch[Msg]] = []
    arrived: dict[int, float] = {}

    def drain_ready() -> None:
        while b.ready(clock.now):
            batch = b.take(clock.now)
            assert batch is not None
            out.append(batch)

    def advance_to(t: float) -> None:
        while (d := b.deadline()) is not None and d <= t:
            clock.now = max(clock.now, d)
            drain_ready()
            after = b.deadline()
            assert after is None or after > d, "deadline reached but the batcher is not ready"
        clock.now = t

    for seq, (gap, key, tokens) in enumerate(stream):
        advance_to(clock.now + gap)
        b.add(Msg(key, seq), tokens)
        arrived[seq] = clock.now
        drain_ready()
    while (d := b.deadline()) is not None:
        advance_to(d)
    assert len(b) == 0
    return out, arrived


@settings(max_examples=300, deadline=None)
@given(cfg=configs, stream=arrivals)
def test_every_item_out_exactly_once_within_caps(cfg: Config, stream: list[tuple[float, str, int]]) -> None:
    batches, _ = simulate(cfg, stream)
    seqs = [m.seq for batch in batches for m in batch.items]
    assert sorted(seqs) == list(range(len(stream)))
    for batch in batches:
        tokens = [stream[m.seq][2] for m in batch.items]
        assert list(batch.token_counts) == tokens
        assert 1 <= len(batch) <= cfg.max_batch_size
        assert batch.padded_tokens == max(tokens) * len(batch)
        assert batch.real_tokens == sum(tokens)
        # The token cap holds, except for a lone item that is over the budget by itself.
        assert batch.padded_tokens <= cfg.max_batch_tokens or len(batch) == 1
        if len(batch) == 1 and batch.padded_tokens > cfg.max_batch_tokens:
            assert batch.reason == ("size" if cfg.max_batch_size == 1 else "tokens")


@settings(max_examples=300, deadline=None)
@given(cfg=configs, stream=arrivals)
def test_no_item_waits_longer_than_max_wait(cfg: Config, stream: list[tuple[float, str, int]]) -> None:
    batches, arrived = simulate(cfg, stream)
    for batch in batches:
        assert batch.oldest_arrival == min(arrived[m.seq] for m in batch.items)
        for m in batch.items:
            # Same expression as the deadline, so float rounding cannot fake a violation.
            assert batch.closed_at <= arrived[m.seq] + cfg.max_wait_s


@settings(max_examples=300, deadline=None)
@given(cfg=configs, stream=arrivals)
def test_order_within_batch_and_within_key(cfg: Config, stream: list[tuple[float, str, int]]) -> None:
    batches, _ = simulate(cfg, stream)
    for batch in batches:
        seqs = [m.seq for m in batch.items]
        assert seqs == sorted(seqs), "items keep arrival order within a batch"
    # A consumer that re-sorts what it has received by sequence sees each key's messages in arrival
    # order and none missing or duplicated.
    emitted: dict[str, list[int]] = defaultdict(list)
    for batch in batches:
        for m in batch.items:
            emitted[m.key].append(m.seq)
    expected: dict[str, list[int]] = defaultdict(list)
    for seq, (_, key, _) in enumerate(stream):
        expected[key].append(seq)
    assert {k: sorted(v) for k, v in emitted.items()} == dict(expected)
    if not cfg.group_by_length:
        # Without length grouping the batcher is strictly FIFO across batches too.
        assert [m.seq for batch in batches for m in batch.items] == list(range(len(stream)))


@settings(max_examples=200, deadline=None)
@given(cfg=configs, stream=arrivals)
def test_each_batch_holds_the_oldest_pending_item(cfg: Config, stream: list[tuple[float, str, int]]) -> None:
    batches, _ = simulate(cfg, stream)
    taken: set[int] = set()
    for batch in batches:
        pending_min = min(s for s in range(len(stream)) if s not in taken)
        assert batch.items[0].seq == pending_min
        taken.update(m.seq for m in batch.items)


# -- the synchronous core, by example --------------------------------------------------------------


def make(clock: FakeClock, **kw: object) -> Batcher[str]:
    params: dict[str, object] = {
        "max_batch_size": 4,
        "max_batch_tokens": 100,
        "max_wait_s": 0.01,
        "capacity": 8,
        "group_by_length": True,
    }
    params.update(kw)
    return Batcher(clock=clock, **params)  # type: ignore[arg-type]


def test_empty_batcher() -> None:
    b = make(FakeClock())
    assert len(b) == 0
    assert b.deadline() is None
    assert b.oldest_age(0.0) is None
    assert not b.ready(1e9)
    assert b.take(1e9) is None


def test_ready_by_age_from_the_oldest_item() -> None:
    clock = FakeClock(10.0)
    b = make(clock)
    b.add("first", 5)
    clock.now = 10.006
    b.add("second", 5)
    assert b.deadline() == 10.0 + 0.01
    assert b.oldest_age(10.008) == pytest.approx(0.008)
    assert not b.ready(10.009)
    assert b.ready(10.01)
    batch = b.take(10.01)
    assert batch is not None
    assert batch.items == ("first", "second")
    assert batch.reason == "age"
    assert batch.queue_waits() == pytest.approx((0.01, 0.004))


def test_ready_by_size_and_reason() -> None:
    b = make(FakeClock(), max_batch_size=3)
    for i in range(4):
        b.add(f"m{i}", 2)
    assert b.ready(b.now())
    batch = b.take(b.now())
    assert batch is not None
    assert batch.reason == "size"
    assert batch.items == ("m0", "m1", "m2")
    assert len(b) == 1


def test_ready_by_tokens_when_all_pending_overflow_the_budget() -> None:
    b = make(FakeClock(), max_batch_tokens=100)
    b.add("a", 30)
    b.add("b", 30)
    b.add("c", 30)
    assert not b.ready(b.now()), "90 padded tokens fit under 100: keep waiting for more"
    b.add("d", 30)
    assert b.ready(b.now())
    batch = b.take(b.now())
    assert batch is not None
    assert batch.items == ("a", "b", "c")
    assert (batch.padded_tokens, batch.reason) == (90, "tokens")


def test_oversized_item_forms_a_batch_alone_at_once() -> None:
    b = make(FakeClock(), max_batch_tokens=100)
    b.add("short", 10)
    b.add("huge", 500)
    b.add("short2", 10)
    first = b.take(b.now())
    assert first is not None
    assert first.items == ("short", "short2")
    assert b.ready(b.now()), "a lone oversized item cannot gain anything by waiting"
    second = b.take(b.now())
    assert second is not None
    assert (second.items, second.padded_tokens, second.reason) == (("huge",), 500, "tokens")


def test_group_by_length_picks_closest_lengths_and_keeps_arrival_order() -> None:
    b = make(FakeClock(), max_batch_size=3, max_batch_tokens=10_000)
    for name, tokens in [("old", 20), ("x", 90), ("y", 21), ("z", 5), ("w", 19), ("v", 60)]:
        b.add(name, tokens)
    batch = b.take(b.now())
    assert batch is not None
    assert batch.items == ("old", "y", "w")  # 20 plus the two closest: 21 and 19, in arrival order
    assert batch.padded_tokens == 21 * 3
    assert batch.max_tokens == 21
    assert batch.padding_efficiency == pytest.approx(60 / 63)
    nxt = b.take(b.now())
    assert nxt is not None
    assert nxt.items[0] == "x", "the oldest pending item is always in the next batch"


def test_group_by_length_prefers_older_among_equal_lengths() -> None:
    b = make(FakeClock(), max_batch_size=3, max_batch_tokens=10_000)
    for name, tokens in [("old", 50), ("s1", 10), ("s2", 10), ("s3", 10), ("s4", 10)]:
        b.add(name, tokens)
    batch = b.take(b.now())
    assert batch is not None
    assert batch.items == ("old", "s1", "s2")


def test_arrival_order_mode_stops_at_first_overflow() -> None:
    b = make(FakeClock(), group_by_length=False, max_batch_tokens=100)
    for name, tokens in [("a", 10), ("b", 60), ("c", 10)]:
        b.add(name, tokens)
    batch = b.take(b.now())
    assert batch is not None
    assert batch.items == ("a",)  # a+b would pad to 120; c must not overtake b
    assert batch.reason == "tokens"


def test_queue_full_at_capacity() -> None:
    b = make(FakeClock(), capacity=2)
    b.add("a", 1)
    b.add("b", 1)
    with pytest.raises(QueueFull):
        b.add("c", 1)
    assert QueueFull.retriable


def test_set_token_budget_applies_to_next_batch() -> None:
    b = make(FakeClock(), max_batch_tokens=1000)
    for i in range(4):
        b.add(f"m{i}", 25)
    b.set_token_budget(50)
    assert b.max_batch_tokens == 50
    batch = b.take(b.now())
    assert batch is not None
    assert len(batch) == 2


def test_take_before_ready_is_a_drain() -> None:
    b = make(FakeClock())
    b.add("a", 3)
    batch = b.take(b.now())
    assert batch is not None
    assert batch.reason == "drain"


@pytest.mark.parametrize(
    "kw",
    [{"max_batch_size": 0}, {"max_batch_tokens": 0}, {"max_wait_s": -1.0}, {"capacity": 0}],
)
def test_invalid_configuration(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make(FakeClock(), **kw)


def test_token_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="token"):
        make(FakeClock()).add("a", 0)


# -- AdaptiveBudget -------------------------------------------------------------------------------


def budget(**kw: object) -> AdaptiveBudget:
    params: dict[str, object] = {
        "initial": 1000,
        "minimum": 100,
        "maximum": 16_000,
        "target_s": 0.05,
        "window": 8,
    }
    params.update(kw)
    return AdaptiveBudget(**params)  # type: ignore[arg-type]


def run_full_batches(ab: AdaptiveBudget, seconds_per_token: float, steps: int, overhead_s: float = 0.0) -> None:
    for _ in range(steps):
        ab.observe(ab.value, overhead_s + seconds_per_token * ab.value)


def test_budget_grows_under_target_multiplicatively_and_bounded() -> None:
    ab = budget()
    # 1000 tokens take 5 ms, a tenth of the target.
    values = [ab.value]
    for _ in range(40):
        run_full_batches(ab, 5e-6, 1)
        values.append(ab.value)
    assert values[-1] > 1000
    assert all(b <= 2 * a for a, b in itertools.pairwise(values)), "at most doubles per step"
    assert values[-1] <= 16_000
    assert 5e-6 * values[-1] <= 0.05, "grew up to, not past, the target"


def test_budget_shrinks_at_once_over_target() -> None:
    ab = budget(initial=8000)
    # 8000 tokens take 100 ms: twice the target.
    new = ab.observe(8000, 0.1)
    assert new < 8000
    assert new >= 4000, "at most halves per step"
    run_full_batches(ab, 0.1 / 8000, 20)
    assert 0.1 / 8000 * ab.value <= 0.05


def test_budget_settles_without_oscillating() -> None:
    ab = budget(initial=500, window=32)
    history = []
    for _ in range(300):
        ab.observe(ab.value, 0.004 + 9e-6 * ab.value)  # fixed overhead + per-token cost
        history.append(ab.value)
    tail = history[-150:]
    assert len(set(tail)) == 1, f"budget keeps moving: {sorted(set(tail))}"
    assert 0.004 + 9e-6 * tail[-1] <= 0.05
    assert 0.004 + 9e-6 * tail[-1] >= 0.6 * 0.05 * 0.5, "settled far too low"


def test_budget_holds_inside_the_dead_band() -> None:
    ab = budget(initial=1000)
    run_full_batches(ab, 0.04 / 1000, 30)  # 80 % of target: inside [0.6, 1.0] x target
    assert ab.value == 1000


def test_small_batches_do_not_drive_the_budget() -> None:
    ab = budget(initial=4000)
    for _ in range(30):
        ab.observe(40, 0.01)  # light load: 1 % full batches dominated by fixed overhead
    assert ab.value == 4000


def test_budget_halves_on_oom_and_stays_below_the_failure() -> None:
    ab = budget(initial=8000)
    assert ab.on_oom() == 4000
    assert ab.value == 4000
    run_full_batches(ab, 1e-7, 50)  # very fast batches would otherwise grow it to the maximum
    assert ab.value <= 6000
    for _ in range(10):
        ab.on_oom()
    assert ab.value == 100, "never below the minimum"


def test_budget_external_cap() -> None:
    ab = budget(initial=8000)
    assert ab.cap(2000) == 2000
    run_full_batches(ab, 1e-7, 50)
    assert ab.value == 2000
    ab.cap(None)
    run_full_batches(ab, 1e-7, 50)
    assert ab.value > 2000
    assert ab.cap(10) == 100, "the minimum is a floor even under an external cap"


def test_budget_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        budget(minimum=2000, initial=1000)
    with pytest.raises(ConfigError):
        budget(target_s=0)
    with pytest.raises(ValueError, match="observation"):
        budget().observe(0, 0.1)
