"""Escalation rules: a small declarative TOML file, validated at load, and the checks that evaluate it.

A rules file::

    version = 1

    [[rule]]
    name = "hostile-turn"          # [a-z0-9][a-z0-9_.-]{0,63}; unique; the alerts' and metrics' rule label
    kind = "share"                 # share | consecutive | rise
    labels = ["anger", "disgust"]  # labels of the model
    min_share = 0.5
    last_messages = 6
    min_messages = 4

Every rule is evaluated after every applied message of its conversation and has an **episode**: it fires
once when its condition becomes true (one ``escalation.v1``), then stays disarmed until the conversation
*recovers*, i.e. ``rearm_after_messages`` consecutive messages meet the rule's recovery condition:

============  =====================================================  ==============================================
kind          fires when                                             a message counts as recovering when
============  =====================================================  ==============================================
share         among the last ``last_messages`` messages (at least    the fire condition is false
              ``min_messages`` of them), the share whose label is
              in ``labels`` (with score >= ``min_score``) is
              >= ``min_share``
consecutive   the last ``count`` messages all have a label in        the fire condition is false (the run is broken)
              ``labels`` with score >= ``min_score``
rise          the decayed mood share of ``labels`` rose by           the mood share of ``labels`` is at or below the
              >= ``min_rise`` from its lowest point within the       lowest point at firing + ``min_rise / 2``
              last ``within_s`` seconds of event time, and is        (it fell back at least halfway)
              >= ``min_level``
============  =====================================================  ==============================================

The message that re-arms a rule cannot fire it; the next one can. "Last messages" are the conversation's
most recent messages by event time. ``rise`` looks back over 8 buckets of ``within_s / 8`` seconds, so
its lookback is between 7/8 and all of ``within_s`` (never more). Thresholds are compared with a 1e-9
tolerance, so a share of exactly 0.5 meets ``min_share = 0.5`` whatever the float rounding.

Every field, with its default:

* all kinds: ``name``, ``kind``, ``labels`` (required), ``description`` (""), ``severity`` ("warning";
  info | warning | critical), ``rearm_after_messages`` (3; 1 to 1000)
* share: ``min_share`` (required; (0, 1]), ``last_messages`` (required; 1 to 64), ``min_messages``
  (``last_messages``; 1 to ``last_messages``), ``min_score`` (0; [0, 1))
* consecutive: ``count`` (required; 1 to 64), ``min_score`` (0; [0, 1))
* rise: ``min_rise`` (required; (0, 1]), ``within_s`` (required; (0, 86400]), ``min_level`` (0; [0, 1])

A file that breaks any of this is refused at load with a :class:`RuleFileError` that names the file, the
rule and the field.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple

from stream_app.conversations.state import ConversationState, Episode, RecentMessage
from stream_app.errors import ConfigError

__all__ = [
    "DEFAULT_RULES_RESOURCE",
    "RISE_BUCKETS",
    "Check",
    "ConsecutiveRule",
    "Observation",
    "RiseRule",
    "Rule",
    "RuleFileError",
    "ShareRule",
    "compile_rules",
    "load_rules",
    "parse_rules",
]

DEFAULT_RULES_RESOURCE = "resources/conversation_rules.toml"
RISE_BUCKETS = 8
MAX_HISTORY_MESSAGES = 64
_EPS = 1e-9
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
Severity = Literal["info", "warning", "critical"]
_SEVERITY_OF: dict[str, Severity] = {"info": "info", "warning": "warning", "critical": "critical"}
RuleKind = Literal["share", "consecutive", "rise"]


class RuleFileError(ConfigError):
    """A rules file that cannot be used; the message names the file, the rule and the field.

    Attributes:
        source: The file (or ``<string>``).
        rule: The rule's name, or its position (``rule[2]``) when it has no usable name; None for the file.
        field: The offending field, or None when the problem is not one field's.
    """

    def __init__(self, source: str, rule: str | None, field: str | None, problem: str) -> None:
        where = source
        if rule is not None:
            where += f": rule {rule}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.rule = rule
        self.field = field


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Fields every rule kind has (see the module docstring for their meaning and limits)."""

    name: str
    labels: tuple[str, ...]
    description: str = ""
    severity: Severity = "warning"
    rearm_after_messages: int = 3

    @property
    def kind(self) -> RuleKind:
        raise NotImplementedError

    def history_messages(self) -> int:
        """How many recent messages the rule needs to see."""
        return 0


@dataclass(frozen=True, kw_only=True)
class ShareRule(Rule):
    """Share of ``labels`` among the last ``last_messages`` messages reaches ``min_share``."""

    min_share: float
    last_messages: int
    min_messages: int
    min_score: float = 0.0

    @property
    def kind(self) -> RuleKind:
        return "share"

    def history_messages(self) -> int:
        return self.last_messages


@dataclass(frozen=True, kw_only=True)
class ConsecutiveRule(Rule):
    """The last ``count`` messages all carry one of ``labels``."""

    count: int
    min_score: float = 0.0

    @property
    def kind(self) -> RuleKind:
        return "consecutive"

    def history_messages(self) -> int:
        return self.count


@dataclass(frozen=True, kw_only=True)
class RiseRule(Rule):
    """The decayed mood share of ``labels`` rose by ``min_rise`` within ``within_s`` seconds of event time."""

    min_rise: float
    within_s: float
    min_level: float = 0.0

    @property
    def kind(self) -> RuleKind:
        return "rise"


# -- loading and validation -------------------------------------------------------------------------------


class _Fields:
    """Typed reads of one rule's table that raise :class:`RuleFileError` naming the rule and field."""

    def __init__(self, doc: Mapping[str, object], source: str, rule: str) -> None:
        self.doc = doc
        self.source = source
        self.rule = rule
        self.used: set[str] = set()

    def error(self, field: str | None, problem: str) -> RuleFileError:
        return RuleFileError(self.source, self.rule, field, problem)

    def _raw(self, field: str, required: bool) -> object:
        self.used.add(field)
        if field not in self.doc:
            if required:
                raise self.error(field, "is required")
            return None
        return self.doc[field]

    def text(self, field: str, default: str | None = None) -> str:
        value = self._raw(field, default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__} {value!r}")
        return value

    def integer(self, field: str, lo: int, hi: int, default: int | None = None) -> int:
        value = self._raw(field, default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"must be an integer, got {type(value).__name__} {value!r}")
        if not lo <= value <= hi:
            raise self.error(field, f"must be between {lo} and {hi}, got {value}")
        return value

    def number(
        self,
        field: str,
        lo: float,
        hi: float,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        default: float | None = None,
    ) -> float:
        value = self._raw(field, default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(field, f"must be a number, got {type(value).__name__} {value!r}")
        x = float(value)
        below = x <= lo if lo_open else x < lo
        above = x >= hi if hi_open else x > hi
        if not math.isfinite(x) or below or above:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise self.error(field, f"must be in {span}, got {value!r}")
        return x

    def labels(self, field: str, known: Sequence[str] | None) -> tuple[str, ...]:
        value = self._raw(field, True)
        if not isinstance(value, list) or not value:
            raise self.error(field, f"must be a non-empty list of label names, got {value!r}")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.error(field, f"must hold label names (strings), got {item!r}")
            if item in out:
                raise self.error(field, f"names {item!r} twice")
            if known is not None and item not in known:
                raise self.error(field, f"unknown label {item!r}; the model's labels are {', '.join(known)}")
            out.append(item)
        return tuple(out)

    def reject_unknown(self) -> None:
        extra = sorted(set(self.doc) - self.used)
        if extra:
            raise self.error(extra[0], "is not a field of this rule kind (a typo?)")


def _parse_rule(doc: Mapping[str, object], source: str, index: int, known: Sequence[str] | None) -> Rule:
    position = f"rule[{index}]"
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleFileError(
            source, position, "name", f"must be a string matching {_NAME.pattern} (lower case), got {name!r}"
        )
    f = _Fields(doc, source, f"'{name}'")
    f.text("name")
    kind = f.text("kind")
    labels = f.labels("labels", known)
    description = f.text("description", "")
    rearm = f.integer("rearm_after_messages", 1, 1000, 3)
    severity = _SEVERITY_OF.get(f.text("severity", "warning"))
    if severity is None:
        raise f.error("severity", f"must be one of {', '.join(_SEVERITY_OF)}, got {f.doc['severity']!r}")
    rule: Rule
    if kind == "share":
        last = f.integer("last_messages", 1, MAX_HISTORY_MESSAGES)
        rule = ShareRule(
            name=name,
            labels=labels,
            description=description,
            severity=severity,
            rearm_after_messages=rearm,
            min_share=f.number("min_share", 0.0, 1.0, lo_open=True),
            last_messages=last,
            min_messages=f.integer("min_messages", 1, last, last),
            min_score=f.number("min_score", 0.0, 1.0, hi_open=True, default=0.0),
        )
    elif kind == "consecutive":
        rule = ConsecutiveRule(
            name=name,
            labels=labels,
            description=description,
            severity=severity,
            rearm_after_messages=rearm,
            count=f.integer("count", 1, MAX_HISTORY_MESSAGES),
            min_score=f.number("min_score", 0.0, 1.0, hi_open=True, default=0.0),
        )
    elif kind == "rise":
        rule = RiseRule(
            name=name,
            labels=labels,
            description=description,
            severity=severity,
            rearm_after_messages=rearm,
            min_rise=f.number("min_rise", 0.0, 1.0, lo_open=True),
            within_s=f.number("within_s", 0.0, 86_400.0, lo_open=True),
            min_level=f.number("min_level", 0.0, 1.0, default=0.0),
        )
    else:
        raise f.error("kind", f"must be one of share, consecutive, rise, got {kind!r}")
    f.reject_unknown()
    return rule


def parse_rules(text: str, *, source: str = "<string>", labels: Sequence[str] | None = None) -> tuple[Rule, ...]:
    """Parse and validate a rules document.

    Args:
        text: The TOML document.
        source: What to call it in error messages (the file's path).
        labels: The model's labels; when given, every rule's labels must be among them.

    Raises:
        RuleFileError: Invalid TOML, an unknown top-level key, a missing or other ``version``, or a rule
            with a missing, mistyped, out-of-range or unknown field, or a repeated name.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleFileError(source, None, None, f"not valid TOML: {exc}") from exc
    extra = sorted(set(doc) - {"version", "rule"})
    if extra:
        raise RuleFileError(source, None, extra[0], "unknown top-level key (expected 'version' and [[rule]] tables)")
    version = doc.get("version")
    if version != 1 or isinstance(version, bool):
        raise RuleFileError(source, None, "version", f"must be 1, got {version!r}")
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleFileError(source, None, "rule", "must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    for i, table in enumerate(tables):
        rule = _parse_rule(table, source, i, labels)
        if any(r.name == rule.name for r in rules):
            raise RuleFileError(source, f"'{rule.name}'", "name", "is used by an earlier rule; names must be unique")
        rules.append(rule)
    return tuple(rules)


def load_rules(path: Path | None = None, *, labels: Sequence[str] | None = None) -> tuple[Rule, ...]:
    """Load a rules file, or the default rule set that ships with the package when ``path`` is None.

    Raises:
        RuleFileError: The file cannot be read or is invalid (see :func:`parse_rules`).
    """
    if path is None:
        resource = resources.files("stream_app").joinpath(DEFAULT_RULES_RESOURCE)
        return parse_rules(
            resource.read_text(encoding="utf-8"), source=f"stream_app/{DEFAULT_RULES_RESOURCE}", labels=labels
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(str(path), None, None, f"cannot be read: {exc}") from exc
    return parse_rules(text, source=str(path), labels=labels)


# -- evaluation ---------------------------------------------------------------------------------------------


class Observation(NamedTuple):
    """What a check saw after one applied message.

    Attributes:
        met: The fire condition holds.
        recovering: The message counts toward re-arming (only consulted while the episode is active).
        value: The measured quantity (share, run length, rise).
        threshold: What ``value`` is compared with.
        recover_level: For ``rise``, the level an episode fired now would have to fall back to.
    """

    met: bool
    recovering: bool
    value: float
    threshold: float
    recover_level: float = 0.0


# (met, recovering) of the kinds whose recovery is "the fire condition is false"
_MET = (True, False)
_NOT_MET = (False, True)


class Check:
    """A rule bound to a label list: evaluates the rule on a conversation's state.

    The tracker calls :meth:`probe` after every applied message (the cheap part: two booleans, no
    :class:`Observation`) and :meth:`observation` only when the rule fires; :meth:`observe` is the two
    together, for callers that want the whole picture at once.

    Attributes:
        rule: The rule.
        key: 32-bit fingerprint matching the rule's episode in stored states.
        members: Indices of the rule's labels in the tracker's label list.
    """

    __slots__ = ("_member", "key", "members", "rule")

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        unknown = [label for label in rule.labels if label not in label_list]
        if unknown:
            raise RuleFileError(
                "<rules>",
                f"'{rule.name}'",
                "labels",
                f"unknown label {unknown[0]!r}; the model's labels are {', '.join(label_list)}",
            )
        self.rule = rule
        self.members = frozenset(label_list.index(label) for label in rule.labels)
        self.key = _fingerprint(rule)
        # membership by label index: a tuple subscript is cheaper than a frozenset lookup
        self._member = tuple(i in self.members for i in range(len(label_list)))

    def probe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> tuple[bool, bool]:
        """``(met, recovering)`` after a message was applied to ``state`` (may update ``episode.history``).

        Call once per applied message, before :meth:`observation`.
        """
        raise NotImplementedError

    def observation(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        """The full :class:`Observation` of the state :meth:`probe` just evaluated (changes nothing)."""
        raise NotImplementedError

    def observe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        """Evaluate the rule after a message was applied to ``state`` (may update ``episode.history``)."""
        self.probe(state, episode, shares)
        return self.observation(state, episode, shares)

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        """The recent messages that support a firing now."""
        raise NotImplementedError

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        """Named numbers that explain ``obs`` (for the alert)."""
        return {}


def _fingerprint(rule: Rule) -> int:
    # Name and kind identify an episode; rise's lookback shapes its stored history, so a new lookback
    # starts afresh. Thresholds are left out on purpose: tuning one must not re-fire every open episode.
    shape = f"{rule.name}\x00{rule.kind}"
    if isinstance(rule, RiseRule):
        shape += f"\x00{rule.within_s!r}"
    return int.from_bytes(hashlib.blake2b(shape.encode(), digest_size=4).digest(), "little")


class _ShareCheck(Check):
    __slots__ = ("_last", "_min_messages", "_min_score", "_threshold")
    rule: ShareRule

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        super().__init__(rule, label_list)
        assert isinstance(rule, ShareRule)
        self._last = rule.last_messages
        self._min_messages = rule.min_messages
        self._min_score = rule.min_score
        self._threshold = rule.min_share - _EPS

    def _hits(self, window: list[RecentMessage]) -> int:
        member = self._member
        floor = self._min_score
        if floor > 0.0:
            return sum([member[m.label] and m.score >= floor for m in window])
        return sum([member[m.label] for m in window])

    def probe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> tuple[bool, bool]:
        window = state.recent[-self._last :]
        n = len(window)
        if n < self._min_messages:
            return _NOT_MET
        return _MET if self._hits(window) / n >= self._threshold else _NOT_MET

    def observation(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        r = self.rule
        window = state.recent[-self._last :]
        n = len(window)
        share = self._hits(window) / n if n else 0.0
        met = n >= r.min_messages and share >= self._threshold
        return Observation(met, not met, share, r.min_share)

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        return state.recent[-self.rule.last_messages :]

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        return {"messages": float(len(self.evidence(state))), "min_messages": float(self.rule.min_messages)}


class _ConsecutiveCheck(Check):
    __slots__ = ("_count", "_min_score")
    rule: ConsecutiveRule

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        super().__init__(rule, label_list)
        assert isinstance(rule, ConsecutiveRule)
        self._count = rule.count
        self._min_score = rule.min_score

    def _run(self, state: ConversationState, cap: int | None = None) -> int:
        """Length of the run of member messages at the end of the recent ones (counted up to ``cap``)."""
        member = self._member
        floor = self._min_score
        run = 0
        for m in reversed(state.recent):
            if not member[m.label] or m.score < floor:
                break
            run += 1
            if run == cap:
                break
        return run

    def probe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> tuple[bool, bool]:
        return _MET if self._run(state, self._count) >= self._count else _NOT_MET

    def observation(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        run = self._run(state)
        met = run >= self._count
        return Observation(met, not met, float(run), float(self._count))

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        return state.recent[-self._run(state) :]


class _RiseCheck(Check):
    __slots__ = ("_bucket_s", "_min_level", "_min_rise", "_order")
    rule: RiseRule

    def __init__(self, rule: Rule, label_list: Sequence[str]) -> None:
        super().__init__(rule, label_list)
        assert isinstance(rule, RiseRule)
        self._bucket_s = rule.within_s / RISE_BUCKETS
        self._order = tuple(sorted(self.members))  # a fixed summation order: the same level bit for bit
        self._min_rise = rule.min_rise - _EPS
        self._min_level = rule.min_level - _EPS

    def _level(self, shares: Sequence[float]) -> float:
        order = self._order
        return shares[order[0]] if len(order) == 1 else math.fsum([shares[i] for i in order])

    def probe(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> tuple[bool, bool]:
        level = self._level(shares)
        bucket = math.floor(state.latest_at / self._bucket_s)
        history = episode.history
        if history and history[-1][0] == bucket:
            if level < history[-1][1]:
                history[-1] = (bucket, level)
        else:
            history.append((bucket, level))
        oldest = bucket - RISE_BUCKETS + 1
        while history[0][0] < oldest:
            del history[0]
        met = level >= self._min_level and level - min([v for _, v in history]) >= self._min_rise
        return met, level <= episode.recover_level + _EPS

    def observation(self, state: ConversationState, episode: Episode, shares: Sequence[float]) -> Observation:
        r = self.rule
        level = self._level(shares)
        baseline = min([v for _, v in episode.history])
        rise = level - baseline
        met = rise >= self._min_rise and level >= self._min_level
        recovering = level <= episode.recover_level + _EPS
        return Observation(met, recovering, rise, r.min_rise, baseline + r.min_rise / 2)

    def evidence(self, state: ConversationState) -> list[RecentMessage]:
        since = state.latest_at - self.rule.within_s
        return [m for m in state.recent if m.sent_at >= since]

    def details(self, state: ConversationState, episode: Episode, obs: Observation) -> dict[str, float]:
        shares = state.mood_shares()
        return {
            "baseline": min(v for _, v in episode.history),
            "level": math.fsum(shares[i] for i in self._order),
            "within_s": self.rule.within_s,
        }


def compile_rules(rules: Sequence[Rule], labels: Sequence[str]) -> tuple[Check, ...]:
    """Bind rules to the model's label list.

    Raises:
        RuleFileError: A rule names a label the model does not have, or two rules share a fingerprint.
    """
    checks: list[Check] = []
    for rule in rules:
        check: Check
        if isinstance(rule, ShareRule):
            check = _ShareCheck(rule, labels)
        elif isinstance(rule, ConsecutiveRule):
            check = _ConsecutiveCheck(rule, labels)
        elif isinstance(rule, RiseRule):
            check = _RiseCheck(rule, labels)
        else:
            raise TypeError(f"unknown rule type {type(rule).__name__}")
        if any(c.key == check.key for c in checks):
            raise RuleFileError("<rules>", f"'{rule.name}'", "name", "collides with another rule's fingerprint")
        checks.append(check)
    return tuple(checks)
