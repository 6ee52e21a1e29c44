"""Helpers for the conversation-state tests: the model's labels, messages, rules and a fake clock."""

from __future__ import annotations

from collections.abc import Sequence

from stream_app.conversations.rules import Rule, parse_rules
from stream_app.conversations.state import ClassifiedMessage
from stream_app.conversations.tracker import ConversationTracker

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
T0 = 1_795_000_200.0  # 2026-11-18; a multiple of 30 s, 300 s and 37.5 s, so panes and buckets start here
TOPIC = "chat.messages.v1"


class FakeClock:
    """Processing time the test sets by hand; by default a day after ``T0`` (no event time is in its future)."""

    def __init__(self, now: float = T0 + 86_400.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scores_for(label: str, score: float = 0.9) -> list[float]:
    """A score vector whose top label is ``label`` with probability ``score``; the rest share what is left."""
    rest = (1.0 - score) / (len(LABELS) - 1)
    return [score if name == label else rest for name in LABELS]


def message(
    offset: int,
    label: str,
    sent_at: float,
    *,
    score: float = 0.9,
    conversation_id: str = "c-1",
    message_id: str | None = None,
    partition: int = 0,
    scores: Sequence[float] | None = None,
) -> ClassifiedMessage:
    return ClassifiedMessage(
        conversation_id=conversation_id,
        message_id=message_id if message_id is not None else f"m-{offset}",
        sent_at=sent_at,
        label_index=LABELS.index(label),
        scores=list(scores) if scores is not None else scores_for(label, score),
        topic=TOPIC,
        partition=partition,
        offset=offset,
    )


def rules(text: str) -> tuple[Rule, ...]:
    return parse_rules("version = 1\n" + text, labels=LABELS)


def tracker(rule_text: str = "", clock: FakeClock | None = None, **kwargs: object) -> ConversationTracker:
    args: dict[str, object] = {"labels": LABELS, "rules": rules(rule_text), "clock": clock or FakeClock()}
    args.update(kwargs)
    return ConversationTracker(**args)  # type: ignore[arg-type]
