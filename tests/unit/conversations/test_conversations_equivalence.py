"""The optimised tracker, rules and codec give exactly what the straightforward reference gives.

``reference.py`` is the code as it was before the performance work: per message it recomputed what the
tracker now updates in place or caches (shares, window counts, record fragments, timestamps). For any
message sequence (late, duplicate, replayed, future-dated, re-partitioned messages; any rule set and
settings) both must leave equal states with identical table bytes, and emit identical records and alerts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from stream_app.records import rfc3339
from tests.unit.conversations.helpers import LABELS, T0, TOPIC, rules
from tests.unit.conversations.reference import ReferenceTracker

pytestmark = pytest.mark.unit

RULE_SETS = [
    "",
    """
[[rule]]
name = "hostile"
kind = "share"
labels = ["anger", "disgust"]
min_share = 0.5
last_messages = 6
min_messages = 4
rearm_after_messages = 2

[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness", "fear"]
count = 3
rearm_after_messages = 1

[[rule]]
name = "spike"
kind = "rise"
labels = ["anger"]
min_rise = 0.25
within_s = 120
rearm_after_messages = 1
""",
    """
[[rule]]
name = "sharp"
kind = "share"
labels = ["anger"]
min_share = 0.34
last_messages = 3
min_messages = 1
min_score = 0.6

[[rule]]
name = "long-run"
kind = "consecutive"
labels = ["anger", "disgust", "neutral"]
count = 12
min_score = 0.5
rearm_after_messages = 4

[[rule]]
name = "dark"
kind = "rise"
labels = ["sadness", "fear", "disgust"]
min_rise = 0.1
within_s = 45
min_level = 0.2
rearm_after_messages = 2

[[rule]]
name = "wide"
kind = "share"
labels = ["joy", "surprise", "neutral"]
min_share = 1.0
last_messages = 40
""",
]

SETTINGS = settings(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Config:
    rules: str
    kwargs: dict[str, Any]


@st.composite
def configs(draw: st.DrawFn) -> Config:
    window = draw(st.sampled_from([(300.0, 30.0), (60.0, 20.0), (30.0, 30.0), (90.0, 7.5)]))
    return Config(
        draw(st.sampled_from(RULE_SETS)),
        {
            "window_s": window[0],
            "window_pane_s": window[1],
            "allowed_lateness_s": draw(st.sampled_from([0.0, 30.0, 60.0])),
            "mood_half_life_s": draw(st.sampled_from([120.0, 7.0, 1e-3])),
            "recent_messages": draw(st.sampled_from([1, 3, 10])),
            "dominant_min_margin": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
            "emit_interval_s": draw(st.sampled_from([0.0, 15.0, 60.0])),
            "max_future_skew_s": draw(st.sampled_from([0.0, 60.0])),
        },
    )


SCORE = st.sampled_from([0.0, 1.0, 0.5, 0.25, 1 / 3, 0.1]) | st.floats(0.0, 1.0)


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[ClassifiedMessage, float]]:
    """Messages with their processing times, in arrival order, over up to three conversations."""
    n = draw(st.integers(1, 45))
    conversations = ["c-1", "c-2", "c-3"][: draw(st.integers(1, 3))]
    t = T0
    now = T0 + 30.0
    partition = 0
    offset = 0
    out: list[tuple[ClassifiedMessage, float]] = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.001, 0.5, 3.0, 10.0, 29.9, 31.0, 75.0, 400.0]))
        sent = t - draw(st.sampled_from([0.0, 0.0, 0.0, 5.0, 45.0, 59.999, 61.0, 500.0]))  # late arrivals
        now += draw(st.sampled_from([0.0, 1.0, 7.0, 14.999, 15.0, 61.0]))
        if draw(st.integers(0, 19)) == 0:
            sent = now + draw(st.sampled_from([30.0, 60.0, 61.0, 3600.0]))  # a client clock in the future
        kind = draw(st.integers(0, 9))
        if kind == 0 and i:
            offset -= draw(st.integers(1, 3))  # a re-delivery (replay)
        elif kind == 1:
            partition = 1 - partition  # the input's partitions changed
        label = draw(st.integers(0, len(LABELS) - 1))
        if draw(st.booleans()):
            top = draw(SCORE)
            rest = (1.0 - top) / (len(LABELS) - 1)
            scores = [top if j == label else rest for j in range(len(LABELS))]
        else:
            scores = draw(st.lists(SCORE, min_size=len(LABELS), max_size=len(LABELS)))
        mid = f"m-{draw(st.integers(0, n))}" if draw(st.integers(0, 6)) == 0 else f"m-{i}"  # duplicate ids
        msg = ClassifiedMessage(
            draw(st.sampled_from(conversations)), mid, sent, label, scores, TOPIC, partition, offset
        )
        out.append((msg, now))
        offset += 1
    return out


def _pair(config: Config) -> tuple[ConversationTracker, ReferenceTracker]:
    r = rules(config.rules)
    return (
        ConversationTracker(labels=LABELS, rules=r, **config.kwargs),
        ReferenceTracker(labels=LABELS, rules=r, **config.kwargs),
    )


def _same_state(fast: ConversationTracker, ref: ReferenceTracker, a: ConversationState, b: ConversationState) -> None:
    assert a == b
    raw = fast.encode(a)
    assert raw == ref.encode(b)
    assert fast.decode(raw) == ref.decode(raw)


@SETTINGS
@given(config=configs(), stream=streams(), data=st.data())
def test_the_tracker_equals_the_reference_message_by_message(
    config: Config, stream: list[tuple[ClassifiedMessage, float]], data: st.DataObject
) -> None:
    fast, ref = _pair(config)
    states: dict[str, ConversationState | None] = {}
    ref_states: dict[str, ConversationState | None] = {}
    for msg, now in stream:
        cid = msg.conversation_id
        if data.draw(st.integers(0, 7)) == 0 and states.get(cid) is not None:
            # a restart: both continue from the table bytes
            raw = fast.encode(states[cid])  # type: ignore[arg-type]
            states[cid], ref_states[cid] = fast.decode(raw), ref.decode(raw)
        try:
            expected = ref.apply(ref_states.get(cid), msg, now)
        except ValueError as exc:
            with pytest.raises(ValueError) as info:
                fast.apply(states.get(cid), msg, now)
            assert str(info.value) == str(exc)
            continue
        got = fast.apply(states.get(cid), msg, now)
        states[cid], ref_states[cid] = got.state, expected.state
        assert (got.outcome, got.changed, got.dominant_changed) == (
            expected.outcome,
            expected.changed,
            expected.dominant_changed,
        )
        assert (got.emit is None) == (expected.emit is None)
        if got.emit is not None and expected.emit is not None:
            assert got.emit.doc == expected.emit.doc
            assert got.emit.to_json() == expected.emit.to_json()
        assert [a.doc for a in got.alerts] == [a.doc for a in expected.alerts]
        assert [a.to_json() for a in got.alerts] == [a.to_json() for a in expected.alerts]
        _same_state(fast, ref, got.state, expected.state)
        kept = got.state.window_counts  # updated message by message since the first record: == summed afresh
        assert kept is None or kept == ref.window_counts(expected.state)
        if got.state.message_count:
            assert fast.snapshot(got.state, now=now + 0.25).doc == ref.snapshot(expected.state, now=now + 0.25).doc
            assert fast.window_counts(got.state) == ref.window_counts(expected.state)


@SETTINGS
@given(
    labels=st.lists(st.integers(0, len(LABELS) - 1), min_size=1, max_size=30),
    scores=st.lists(SCORE, min_size=len(LABELS), max_size=len(LABELS)),
)
def test_malformed_messages_are_refused_alike(labels: list[int], scores: list[float]) -> None:
    fast, ref = _pair(Config(RULE_SETS[1], {}))
    bad = [
        [*scores[:-1], math.nan],
        [*scores[:-1], -0.1],
        [*scores[:-1], 1.5],
        [math.nan, *scores[1:]],
        scores[:-1],
        [*scores, 0.0],
    ]
    a = b = None
    for i, label in enumerate(labels):
        msg = ClassifiedMessage("c", f"m-{i}", T0 + i, label, scores, TOPIC, 0, i)
        a, b = fast.apply(a, msg, T0 + 100).state, ref.apply(b, msg, T0 + 100).state
    for vector in bad:
        msg = ClassifiedMessage("c", "m-x", T0 + 50, labels[0], vector, TOPIC, 0, 99)
        with pytest.raises(ValueError) as expected:
            ref.apply(b, msg, T0 + 100)
        with pytest.raises(ValueError) as got:
            fast.apply(a, msg, T0 + 100)
        assert str(got.value) == str(expected.value)
    for msg in [
        ClassifiedMessage("c", "m-y", math.inf, 0, scores, TOPIC, 0, 100),
        ClassifiedMessage("c", "m-y", T0, len(LABELS), scores, TOPIC, 0, 100),
        ClassifiedMessage("c", "m-y", T0, -1, scores, TOPIC, 0, 100),
        ClassifiedMessage("other", "m-y", T0, 0, scores, TOPIC, 0, 100),
    ]:
        with pytest.raises(ValueError) as expected:
            ref.apply(b, msg, T0 + 100)
        with pytest.raises(ValueError) as got:
            fast.apply(a, msg, T0 + 100)
        assert str(got.value) == str(expected.value)
    assert a == b


@settings(deadline=None, max_examples=400)
@given(
    ts=st.floats(-62_135_596_800.0, 253_402_300_799.0)
    | st.integers(-(10**6), 10**6).map(lambda k: 1_795_000_200.0 + k * 0.0005)
    | st.integers(0, 10**6).map(lambda k: k / 1000.0 - 0.0000005)
)
def test_the_fast_timestamp_equals_rfc3339(ts: float) -> None:
    from stream_app.conversations.records import format_time

    try:
        expected = rfc3339(ts)
    except (ValueError, OverflowError, OSError) as exc:
        with pytest.raises(type(exc)):
            format_time(ts)
        return
    assert format_time(ts) == expected


def _near_halves(k: int) -> list[float]:
    """The doubles around the decimal tie (k + 0.5) / 1e6, where a scaled fast path could go wrong."""
    tie = (k + 0.5) / 1e6
    return [tie, math.nextafter(tie, 0.0), math.nextafter(tie, 1e9), math.nextafter(math.nextafter(tie, 1e9), 1e9)]


@settings(deadline=None, max_examples=2000)
@given(
    x=st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(0.0, 1.0)
    | st.floats(0.0, 5000.0)
    | st.integers(0, 5_000_000_000).flatmap(lambda k: st.sampled_from(_near_halves(k)))
    | st.integers(0, 10**6).map(lambda k: k / 1e6)
    | st.sampled_from([0.0, -0.0, 4293.9999995, 4294.0, 1e-7, 5e-7, 1.5e-6, 2.5e-6, 0.0000005])
)
def test_round6_equals_round(x: float) -> None:
    from stream_app.conversations.records import round6

    try:
        expected = round(x, 6)
    except (ValueError, OverflowError) as exc:  # pragma: no cover - round(x, 6) accepts every float
        with pytest.raises(type(exc)):
            round6(x)
        return
    got = round6(x)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected and math.copysign(1.0, got) == math.copysign(1.0, expected)


BIG = st.sampled_from([0, 1, 65_535, 65_536, 2**32 - 1, 2**32, 2**40])


@settings(deadline=None, max_examples=200)
@given(stream=streams(), data=st.data())
def test_the_codec_equals_the_reference_with_counters_at_and_past_their_limits(
    stream: list[tuple[ClassifiedMessage, float]], data: st.DataObject
) -> None:
    fast, ref = _pair(Config(RULE_SETS[1], {}))
    state = None
    for msg, now in stream:
        state = fast.apply(state, msg._replace(conversation_id="c"), now).state
    assert state is not None
    for name in ["message_count", "late_ignored", "duplicates_ignored", "future_clamped", "dominant_messages"]:
        setattr(state, name, data.draw(BIG, label=name))
    for e in state.episodes:
        e.streak, e.fired = data.draw(BIG, label="streak"), data.draw(BIG, label="fired")
    for counts in state.panes.values():
        counts[data.draw(st.integers(0, len(LABELS) - 1))] = data.draw(BIG, label="count")
    raw = fast.encode(state)
    assert raw == ref.encode(state)
    assert fast.decode(raw) == ref.decode(raw)
