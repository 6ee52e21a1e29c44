"""conversation_state.v1 and escalation.v1: the Python records agree with the JSON Schema contracts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import BaseModel, ValidationError
from referencing import Registry, Resource

from stream_app.conversations.records import (
    AlertOutput,
    ConversationStateRecord,
    EscalationRecord,
    StateOutput,
    alert_id_for,
)
from stream_app.conversations.state import ConversationState
from stream_app.conversations.tracker import ConversationTracker
from tests.unit.conversations.helpers import LABELS, T0, message, tracker

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
NAMES = ["conversation_state.v1", "escalation.v1"]
MODELS: dict[str, type[BaseModel]] = {
    "conversation_state.v1": ConversationStateRecord,
    "escalation.v1": EscalationRecord,
}


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())  # type: ignore[no-any-return]


# escalation.v1 refers to conversation_state.v1.json by its $id; consumers preload both the same way.
REGISTRY: Registry = Registry().with_resources([(s["$id"], Resource.from_contents(s)) for s in map(_schema, NAMES)])


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = _schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=REGISTRY, format_checker=cls.FORMAT_CHECKER)


def _example(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / "examples" / f"{name}.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", NAMES)
def test_example_validates_against_its_schema(name: str) -> None:
    _validator(name).validate(_example(name))


@pytest.mark.parametrize("name", NAMES)
def test_example_round_trips_through_the_record(name: str) -> None:
    example = _example(name)
    record = MODELS[name].model_validate(example)
    out = orjson.loads(record.to_json())  # type: ignore[attr-defined]
    assert out == example
    _validator(name).validate(out)


def test_the_format_checker_is_live() -> None:
    """A wrong date-time must fail, or the validations above would prove less than they claim."""
    doc = _example("conversation_state.v1")
    doc["emitted_at"] = "yesterday"
    with pytest.raises(jsonschema.ValidationError, match="date-time"):
        _validator("conversation_state.v1").validate(doc)


ALL_KINDS = """
[[rule]]
name = "hostile"
kind = "share"
labels = ["anger", "disgust"]
min_share = 0.5
last_messages = 6
min_messages = 4

[[rule]]
name = "angry-run"
kind = "consecutive"
labels = ["anger"]
count = 3

[[rule]]
name = "spike"
kind = "rise"
severity = "critical"
description = "anger jumps"
labels = ["anger"]
min_rise = 0.3
within_s = 300
"""


def _escalating() -> tuple[ConversationTracker, ConversationState, list[StateOutput], list[AlertOutput]]:
    t = tracker(ALL_KINDS, emit_interval_s=0.0)
    state: ConversationState | None = None
    emitted: list[StateOutput] = []
    alerts: list[AlertOutput] = []
    for i, label in enumerate(["neutral", "joy", "neutral", "anger", "anger", "anger", "disgust"]):
        u = t.apply(state, message(i, label, T0 + 15 * i), now=T0 + 15 * i + 0.05)
        state = u.state
        emitted += [u.emit] if u.emit else []
        alerts += u.alerts
    assert state is not None
    return t, state, emitted, alerts


def test_built_records_serialise_to_valid_documents() -> None:
    t, state, emitted, alerts = _escalating()
    assert {a.doc["rule"]["kind"] for a in alerts} == {"share", "consecutive", "rise"}
    assert {e.reason for e in emitted} == {"dominant_changed", "interval"}
    for out in [*emitted, t.snapshot(state)]:
        doc = orjson.loads(out.to_json())
        _validator("conversation_state.v1").validate(doc)
        assert orjson.loads(out.record().to_json()) == doc, "the pydantic mirror takes it unchanged"
    for alert in alerts:
        doc = orjson.loads(alert.to_json())
        _validator("escalation.v1").validate(doc)
        assert orjson.loads(alert.record().to_json()) == doc
        assert (alert.rule, alert.alert_id, alert.conversation_id) == (
            doc["rule"]["name"],
            doc["alert_id"],
            doc["conversation_id"],
        )
        assert doc["state"]["reason"] == "alert"
        assert set(doc["state"]["window"]["counts"]) == set(LABELS)


def test_a_state_record_says_what_the_state_holds() -> None:
    t, state, _, _ = _escalating()
    doc = orjson.loads(t.snapshot(state, now=T0 + 500).to_json())
    assert doc["conversation_id"] == "c-1" and doc["reason"] == "snapshot" and doc["message_count"] == 7
    assert doc["window"]["message_count"] == sum(doc["window"]["counts"].values()) == 7
    assert doc["window"]["counts"]["anger"] == 3
    assert sum(doc["mood"]["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["dominant"]["label"] == "anger"
    assert [m["message_id"] for m in doc["recent"]] == [f"m-{i}" for i in range(7)]
    assert doc["source"] == {"partition": 0, "offset": 6}
    assert doc["started_at"] == "2026-11-18T11:10:00.000Z" and doc["emitted_at"] == "2026-11-18T11:18:20.000Z"
    assert [e["rule"] for e in doc["episodes"]] == ["hostile", "angry-run", "spike"]


def _broken(name: str) -> list[dict[str, Any]]:
    doc = _example(name)
    out = []
    extra = copy.deepcopy(doc)
    extra["surprise"] = 1
    out.append(extra)
    missing = copy.deepcopy(doc)
    del missing["conversation_id"]
    out.append(missing)
    wrong_schema = copy.deepcopy(doc)
    wrong_schema["schema"] = "emotion_event.v1"
    out.append(wrong_schema)
    if name == "escalation.v1":
        bad_id = copy.deepcopy(doc)
        bad_id["alert_id"] = "not-hex"
        out.append(bad_id)
        bad_kind = copy.deepcopy(doc)
        bad_kind["rule"]["kind"] = "threshold"
        out.append(bad_kind)
        bad_state = copy.deepcopy(doc)
        bad_state["state"]["message_count"] = 0
        out.append(bad_state)
    else:
        bad_reason = copy.deepcopy(doc)
        bad_reason["reason"] = "because"
        out.append(bad_reason)
        bad_score = copy.deepcopy(doc)
        bad_score["recent"][0]["score"] = 1.5
        out.append(bad_score)
    return out


@pytest.mark.parametrize(("name", "doc"), [(n, d) for n in NAMES for d in _broken(n)])
def test_python_and_json_schema_reject_the_same_documents(name: str, doc: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validator(name).validate(doc)
    with pytest.raises(ValidationError):
        MODELS[name].model_validate(doc)


def test_alert_id_is_stable_and_distinct() -> None:
    assert alert_id_for("t", 0, 1, "r") == alert_id_for("t", 0, 1, "r")
    ids = {alert_id_for("t", p, o, r) for p in range(3) for o in range(50) for r in ("a", "b")}
    assert len(ids) == 300
