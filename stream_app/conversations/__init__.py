"""Conversation state: a live emotional picture of every conversation, and escalation alerts.

Transport-free (no faust, no Kafka client): the worker keeps each conversation's state as
:meth:`ConversationTracker.encode` bytes in a table keyed by conversation_id and co-partitioned with the
input, applies every classified message in source order, produces the ``conversation_state.v1`` and
``escalation.v1`` records the tracker returns, and sweeps expired conversations. See
``docs/conversations.md``.
"""

from __future__ import annotations

from stream_app.conversations.codec import CODEC_VERSION, StateCodec
from stream_app.conversations.records import ConversationStateRecord, EscalationRecord, alert_id_for
from stream_app.conversations.rules import (
    ConsecutiveRule,
    RiseRule,
    Rule,
    RuleFileError,
    ShareRule,
    load_rules,
    parse_rules,
)
from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker, Update, is_expired

__all__ = [
    "CODEC_VERSION",
    "ClassifiedMessage",
    "ConsecutiveRule",
    "ConversationState",
    "ConversationStateRecord",
    "ConversationTracker",
    "EscalationRecord",
    "RiseRule",
    "Rule",
    "RuleFileError",
    "ShareRule",
    "StateCodec",
    "Update",
    "alert_id_for",
    "is_expired",
    "load_rules",
    "parse_rules",
]
