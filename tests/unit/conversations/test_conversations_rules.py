"""Escalation rules: the file's validation, and each kind firing once per episode at the right message."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from stream_app.conversations.records import EscalationRecord, alert_id_for
from stream_app.conversations.rules import (
    ConsecutiveRule,
    RiseRule,
    RuleFileError,
    ShareRule,
    load_rules,
    parse_rules,
)
from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from stream_app.errors import ConfigError
from tests.unit.conversations.helpers import LABELS, T0, TOPIC, message, tracker

pytestmark = pytest.mark.unit

SHARE = """
[[rule]]
name = "hostile"
kind = "share"
labels = ["anger", "disgust"]
min_share = 0.5
last_messages = 6
min_messages = 4
rearm_after_messages = 3
"""
CONSECUTIVE = """
[[rule]]
name = "distress"
kind = "consecutive"
labels = ["sadness", "fear"]
count = 3
min_score = 0.5
rearm_after_messages = 2
"""
RISE = """
[[rule]]
name = "spike"
kind = "rise"
labels = ["anger"]
min_rise = 0.3
within_s = 300
rearm_after_messages = 2
"""


def feed(
    t: ConversationTracker, msgs: Sequence[ClassifiedMessage], state: ConversationState | None = None
) -> tuple[ConversationState, dict[int, list[EscalationRecord]]]:
    """Apply ``msgs``; the alerts by the index of the message that fired them."""
    fired: dict[int, list[EscalationRecord]] = {}
    for i, m in enumerate(msgs):
        u = t.apply(state, m)
        state = u.state
        if u.alerts:
            fired[i] = [a.record() for a in u.alerts]
    assert state is not None
    return state, fired


def labelled(seq: str, start: int = 0, gap_s: float = 20.0, score: float = 0.9) -> list[ClassifiedMessage]:
    """Messages from a string of label initials: a anger, d disgust, f fear, j joy, n neutral, s sadness."""
    names = {"a": "anger", "d": "disgust", "f": "fear", "j": "joy", "n": "neutral", "s": "sadness", "u": "surprise"}
    return [message(start + i, names[c], T0 + gap_s * (start + i), score=score) for i, c in enumerate(seq)]


# -- the file ---------------------------------------------------------------------------------------------------


def test_the_default_rules_load_and_cover_every_kind() -> None:
    rules = load_rules(labels=LABELS)
    assert [r.name for r in rules] == ["hostile-turn", "distress-run", "anger-spike"]
    assert {type(r) for r in rules} == {ShareRule, ConsecutiveRule, RiseRule}
    hostile = rules[0]
    assert isinstance(hostile, ShareRule)
    assert (hostile.labels, hostile.min_share, hostile.last_messages, hostile.min_messages) == (
        ("anger", "disgust"),
        0.5,
        6,
        4,
    )
    ConversationTracker(labels=LABELS, rules=rules)


def test_a_rules_file_loads_from_a_path_and_defaults_apply(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("version = 1\n" + SHARE.replace("min_messages = 4\n", "").replace("rearm_after_messages = 3\n", ""))
    (rule,) = load_rules(path, labels=LABELS)
    assert isinstance(rule, ShareRule)
    assert (rule.min_messages, rule.rearm_after_messages, rule.severity, rule.min_score) == (6, 3, "warning", 0.0)


def test_an_empty_rule_set_is_allowed() -> None:
    assert parse_rules("version = 1\n") == ()


def test_a_missing_file_is_a_rule_file_error(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="cannot be read"):
        load_rules(tmp_path / "nope.toml")


BAD = [
    # (document after "version = 1", rule, field, words in the message)
    ('[[rule]]\nkind = "share"\n', "rule[0]", "name", "must be a string"),
    ('[[rule]]\nname = "Hostile Turn"\n', "rule[0]", "name", "lower case"),
    (SHARE + SHARE, "'hostile'", "name", "unique"),
    (SHARE.replace('"share"', '"ratio"'), "'hostile'", "kind", "share, consecutive, rise"),
    (SHARE.replace('labels = ["anger", "disgust"]', "labels = []"), "'hostile'", "labels", "non-empty"),
    (SHARE.replace('"disgust"', '"rage"'), "'hostile'", "labels", "unknown label 'rage'"),
    (SHARE.replace('"disgust"', '"anger"'), "'hostile'", "labels", "twice"),
    (SHARE.replace('labels = ["anger", "disgust"]', 'labels = "anger"'), "'hostile'", "labels", "list"),
    (SHARE.replace("min_share = 0.5", "min_share = 1.5"), "'hostile'", "min_share", "(0, 1]"),
    (SHARE.replace("min_share = 0.5", "min_share = 0"), "'hostile'", "min_share", "(0, 1]"),
    (SHARE.replace("min_share = 0.5", 'min_share = "half"'), "'hostile'", "min_share", "number"),
    (SHARE.replace("min_share = 0.5\n", ""), "'hostile'", "min_share", "required"),
    (SHARE.replace("last_messages = 6", "last_messages = 65"), "'hostile'", "last_messages", "between 1 and 64"),
    (SHARE.replace("last_messages = 6", "last_messages = 6.0"), "'hostile'", "last_messages", "integer"),
    (SHARE.replace("last_messages = 6", "last_messages = true"), "'hostile'", "last_messages", "integer"),
    (SHARE.replace("min_messages = 4", "min_messages = 7"), "'hostile'", "min_messages", "between 1 and 6"),
    (SHARE.replace("rearm_after_messages = 3", "rearm_after_messages = 0"), "'hostile'", "rearm_after_messages", ""),
    (SHARE + "treshold = 0.5\n", "'hostile'", "treshold", "not a field"),
    (SHARE + 'severity = "urgent"\n', "'hostile'", "severity", "info, warning, critical"),
    (SHARE + "description = 3\n", "'hostile'", "description", "string"),
    (CONSECUTIVE.replace("count = 3\n", ""), "'distress'", "count", "required"),
    (CONSECUTIVE.replace("min_score = 0.5", "min_score = 1.0"), "'distress'", "min_score", "[0, 1)"),
    (CONSECUTIVE + "min_share = 0.5\n", "'distress'", "min_share", "not a field"),
    (RISE.replace("within_s = 300", "within_s = 0"), "'spike'", "within_s", "(0, 86400]"),
    (RISE.replace("min_rise = 0.3", "min_rise = -0.3"), "'spike'", "min_rise", "(0, 1]"),
    (RISE + "min_level = 2\n", "'spike'", "min_level", "[0, 1]"),
]


@pytest.mark.parametrize(("doc", "rule", "field", "words"), BAD)
def test_an_invalid_rule_is_refused_naming_the_rule_and_field(doc: str, rule: str, field: str, words: str) -> None:
    with pytest.raises(RuleFileError) as info:
        parse_rules("version = 1\n" + doc, source="rules.toml", labels=LABELS)
    err = info.value
    assert (err.source, err.rule, err.field) == ("rules.toml", rule, field)
    assert str(err).startswith(f"rules.toml: rule {rule}, field '{field}': ")
    assert words in str(err)
    assert isinstance(err, ConfigError)


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ("version = 1\n[[rule\n", None, "not valid TOML"),
        (SHARE, "version", "must be 1"),
        ("version = 2\n", "version", "must be 1"),
        ("version = 1\nrules = []\n", "rules", "unknown top-level key"),
        ("version = 1\nrule = 3\n", "rule", "array of tables"),
    ],
)
def test_an_invalid_file_is_refused(doc: str, field: str | None, words: str) -> None:
    with pytest.raises(RuleFileError) as info:
        parse_rules(doc, source="rules.toml")
    assert (info.value.rule, info.value.field) == (None, field)
    assert words in str(info.value)


def test_labels_are_checked_against_the_model_when_the_tracker_binds_the_rules() -> None:
    rules = parse_rules("version = 1\n" + SHARE)  # no label list at parse time
    with pytest.raises(RuleFileError, match="rule 'hostile', field 'labels': unknown label 'disgust'"):
        ConversationTracker(labels=("anger", "joy", "neutral"), rules=rules)


# -- share ----------------------------------------------------------------------------------------------------


def test_share_fires_once_per_episode_and_rearms_after_recovery() -> None:
    t = tracker(SHARE)
    #            0123456789012
    msgs = labelled("naannnnnnnaaa")
    state, fired = feed(t, msgs)
    # index 2: 2 of 3 messages, fewer than min_messages; index 3: 2 of 4 = 0.5 fires.
    # 4..6 stay at >= 0.5 (active); 7, 8, 9 are below 0.5: the third re-arms; 12 reaches 3 of 6 again.
    assert sorted(fired) == [3, 12]
    first, second = fired[3][0], fired[12][0]
    assert (first.episode, second.episode) == (1, 2)
    assert first.rule.name == "hostile" and first.rule.kind == "share"
    assert first.evidence.value == 0.5 and first.evidence.threshold == 0.5
    assert [m.message_id for m in first.evidence.messages] == ["m-0", "m-1", "m-2", "m-3"]
    assert [m.label for m in first.evidence.messages] == ["neutral", "anger", "anger", "neutral"]
    assert first.evidence.messages[1].score == pytest.approx(0.9)
    assert first.triggered_by.message_id == "m-3" and first.triggered_by.source.offset == 3
    assert first.alert_id == alert_id_for(TOPIC, 0, 3, "hostile")
    assert first.state.reason == "alert" and first.state.episodes[0].active
    assert state.episodes[0].fired == 2 and state.episodes[0].active


def test_share_does_not_rearm_while_the_condition_keeps_coming_back() -> None:
    t = tracker(SHARE)
    # fires at 3; afterwards the share of the last 6 dips below 0.5 for one message in four (9, 13), never 3
    state, fired = feed(t, labelled("aaaa" + "nnaa" * 3))
    assert sorted(fired) == [3]
    assert state.episodes[0].active and state.episodes[0].streak == 0


def test_share_counts_only_labels_with_enough_score() -> None:
    t = tracker(SHARE + "min_score = 0.8\n")
    msgs = [message(i, "anger", T0 + i, score=0.7) for i in range(6)]
    _, fired = feed(t, msgs)
    assert fired == {}


# -- consecutive ------------------------------------------------------------------------------------------------


def test_consecutive_fires_at_the_nth_message_of_a_run_once_and_rearms() -> None:
    t = tracker(CONSECUTIVE)
    #                 0123456789012
    _, fired = feed(t, labelled("sfnsfssnsfsss"))
    # 5 completes s,f,s; 6 continues the run (active); 7 breaks it (1), 8 is a run of 1 (2: re-armed);
    # 9 and 10 make a new run of 3.
    assert sorted(fired) == [5, 10]
    alert = fired[5][0]
    assert [m.message_id for m in alert.evidence.messages] == ["m-3", "m-4", "m-5"]
    assert alert.evidence.value == 3 and alert.evidence.threshold == 3
    assert fired[10][0].episode == 2


def test_a_low_score_breaks_the_run() -> None:
    t = tracker(CONSECUTIVE)
    msgs = [*labelled("ss"), message(2, "sadness", T0 + 40, score=0.4), *labelled("ss", start=3)]
    _, fired = feed(t, msgs)
    assert fired == {}
    _, fired = feed(t, labelled("sss", start=0))
    assert sorted(fired) == [2]


# -- rise -------------------------------------------------------------------------------------------------------


def anger_at(i: int, anger: float, gap_s: float = 1.0) -> ClassifiedMessage:
    """A message whose scores are ``anger`` for anger and the rest for neutral."""
    scores = [anger if n == "anger" else 1.0 - anger if n == "neutral" else 0.0 for n in LABELS]
    return message(i, "anger" if anger >= 0.5 else "neutral", T0 + gap_s * i, scores=scores)


def test_rise_fires_when_the_decayed_share_jumps_and_rearms_once_it_fell_back_halfway() -> None:
    # A half-life far longer than the test makes the mood share the plain mean of the anger scores.
    t = tracker(RISE, mood_half_life_s=1e12)
    anger = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # means:  0, 0, 1/3 (rise 0.33: fires; recovers at <= 0 + 0.15), 1/2, 2/5, 1/3, 2/7, 1/4,
    # ... this stays above 0.15: never re-armed, so the later rise fires nothing.
    state, fired = feed(t, [anger_at(i, a) for i, a in enumerate(anger)])
    assert sorted(fired) == [2]
    alert = fired[2][0]
    assert alert.evidence.value == pytest.approx(1 / 3, abs=1e-6) and alert.evidence.threshold == 0.3
    assert alert.evidence.details["baseline"] == 0.0
    assert alert.evidence.details["level"] == pytest.approx(1 / 3, abs=1e-6)
    assert [m.message_id for m in alert.evidence.messages] == ["m-0", "m-1", "m-2"]
    assert state.episodes[0].active and state.episodes[0].recover_level == pytest.approx(0.15)

    t = tracker(RISE, mood_half_life_s=1e12)
    anger = [0.0, 0.0, 1.0] + [0.0] * 5 + [1.0] * 4
    # means after index 2: 1/3 fires; then 1/4 .. 1/8: 1/7 (index 6) and 1/8 (index 7) are <= 0.15: re-armed at
    # 7. Then 2/9 and 3/10: 0.3 above the lowest point in the lookback (0, messages 0 and 1) fires at index 9.
    state, fired = feed(t, [anger_at(i, a) for i, a in enumerate(anger)])
    assert sorted(fired) == [2, 9]
    assert fired[9][0].episode == 2
    assert fired[9][0].evidence.value == pytest.approx(0.3, abs=1e-6)
    assert state.episodes[0].active and state.episodes[0].fired == 2


def test_the_message_that_rearms_a_rule_cannot_fire_it() -> None:
    # A half-life of 1 ms with messages 1 s apart: the mood share is the last message's anger score.
    t = tracker(RISE, mood_half_life_s=1e-3)
    anger = [0.3, 0.7, 0.0, 0.4, 0.42]
    # 1: 0.7 - 0.3 fires (recovers at <= 0.3 + 0.15); 2: 0.0 recovers (1 of 2); 3: 0.4 recovers (2 of 2) and
    # re-arms, though 0.4 is also 0.4 above the lowest point (0.0): it does not fire; 4: 0.42 fires.
    _, fired = feed(t, [anger_at(i, a) for i, a in enumerate(anger)])
    assert sorted(fired) == [1, 4]
    assert fired[4][0].episode == 2


def test_rise_looks_back_only_within_s() -> None:
    t = tracker(RISE, mood_half_life_s=1e12)
    # One message every 150 s (the lookback of 262.5 to 300 s holds the previous message only): mean anger
    # 0, 0.2, 0.267, 0.325, 0.38, 0.433 rises by 0.43 in all, but by at most 0.2 within any 300 s.
    anger = [0.0, 0.4, 0.4, 0.5, 0.6, 0.7]
    _, fired = feed(t, [anger_at(i, a, gap_s=150.0) for i, a in enumerate(anger)])
    assert fired == {}
    # the same scores 10 s apart: 0.325 above message 0 at index 3
    _, fired = feed(t, [anger_at(i, a, gap_s=10.0) for i, a in enumerate(anger)])
    assert sorted(fired) == [3]


def test_rise_respects_min_level() -> None:
    t = tracker(RISE + "min_level = 0.5\n", mood_half_life_s=1e12)
    anger = [0.0, 0.0, 1.0, 1.0]  # means 1/3 (rise .33, level below .5), then 1/2
    _, fired = feed(t, [anger_at(i, a) for i, a in enumerate(anger)])
    assert sorted(fired) == [3]


# -- episodes across restarts and rule changes ----------------------------------------------------------------


def test_episodes_survive_a_restart_through_the_codec() -> None:
    t = tracker(SHARE)
    msgs = labelled("naannnnnnnaaa")
    state, _ = feed(t, msgs[:5])  # fired at 3, still active
    restarted = tracker(SHARE)  # a new process, the same rules
    state = restarted.decode(t.encode(state))
    assert state.episodes[0].active and state.episodes[0].fired == 1
    _, fired = feed(restarted, msgs[5:], state)
    assert sorted(i + 5 for i in fired) == [12], "no second alert for the open episode"


def test_changed_rules_keep_matching_episodes_and_start_new_ones_armed() -> None:
    t = tracker(SHARE + CONSECUTIVE)
    state, _ = feed(t, labelled("aaaa"))
    raw = t.encode(state)
    edited = tracker(CONSECUTIVE + SHARE.replace("min_share = 0.5", "min_share = 0.4") + RISE)
    moved = edited.decode(raw)
    by_name = {c.rule.name: e for c, e in zip(edited.checks, moved.episodes, strict=True)}
    assert by_name["hostile"].active and by_name["hostile"].fired == 1, "a tuned threshold keeps the episode"
    assert not by_name["spike"].active and by_name["spike"].fired == 0
    dropped = tracker(CONSECUTIVE).decode(raw)
    assert len(dropped.episodes) == 1 and dropped.episodes[0].fired == 0


def test_at_most_one_alert_per_rule_and_message_and_all_rules_can_fire_together() -> None:
    t = tracker(SHARE + CONSECUTIVE.replace('["sadness", "fear"]', '["anger"]') + RISE, mood_half_life_s=1e12)
    msgs = [anger_at(i, a) for i, a in enumerate([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])]
    _, fired = feed(t, msgs)
    names = [a.rule.name for i in sorted(fired) for a in fired[i]]
    assert sorted(names) == ["distress", "hostile", "spike"]
    for alerts in fired.values():
        assert len({a.rule.name for a in alerts}) == len(alerts)
