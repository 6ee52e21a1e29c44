"""The naive baseline decides like the worker: same events, same dead-letter reasons (fake classifier)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from stream_app.devtools.clients import chat_message
from stream_app.errors import EngineError
from stream_app.perf.baseline import BaselineConfig, RawRecord, handle_record
from stream_app.records import DeadLetter, EmotionEvent, ModelInfo, event_id_for
from stream_app.settings import load_settings

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")


class FakeClassifier:
    labels = LABELS
    model_info = ModelInfo(name="fake", version="1", runtime="none", precision="fp32", device="cpu")
    max_length = 8

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.seen: list[str] = []

    def n_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        self.seen.append(text)
        if text == self.fail_on:
            raise EngineError("boom")
        probs = np.full(len(LABELS), 0.05, dtype=np.float32)
        probs[3 if "happy" in text else 4] = 0.7
        return probs


def _cfg(reject: bool = False) -> BaselineConfig:
    return replace(BaselineConfig.from_settings(load_settings()), overlong_reject=reject, max_text_chars=200)


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _rec(value: bytes, offset: int = 7) -> RawRecord:
    return RawRecord("chat.messages.v1", 2, offset, b"conv-1", value)


def test_a_good_message_becomes_a_valid_event() -> None:
    _, value = chat_message("m-1", "conv-1", "I am so happy today", user_id="u-1")
    clf = FakeClassifier()
    out = handle_record(clf, _cfg(), _rec(value), received_wall=1.7e9, received_mono=0.0)
    assert isinstance(out, EmotionEvent)
    doc = orjson.loads(out.to_json())
    _validator("emotion_event.v1").validate(doc)
    assert doc["label"] == "joy" and doc["score"] == pytest.approx(0.7)
    assert doc["cache"] == {"hit": False, "level": "none"}
    assert doc["event_id"] == event_id_for("chat.messages.v1", 2, 7)
    assert doc["truncated"] is False
    assert clf.seen == ["I am so happy today"]


GOOD = {"message_id": "x", "conversation_id": "c", "user_id": "u", "sent_at": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("value", "reason", "stage"),
    [
        (b"{not json", "undecodable", "decode"),
        (b"\xff\xfe", "undecodable", "decode"),
        (orjson.dumps({**GOOD, "text": " \t"}), "empty_text", "validate"),
        (orjson.dumps({**GOOD, "text": 3}), "schema", "validate"),
        (b"[1]", "schema", "validate"),
        (orjson.dumps({**GOOD, "text": "x" * 300_000}), "too_large", "decode"),
    ],
)
def test_bad_input_is_dead_lettered_with_the_workers_reason(value: bytes, reason: str, stage: str) -> None:
    clf = FakeClassifier()
    out = handle_record(clf, _cfg(), _rec(value), received_wall=1.7e9, received_mono=0.0)
    assert isinstance(out, DeadLetter)
    _validator("dead_letter.v1").validate(orjson.loads(out.to_json()))
    assert (out.reason, out.stage) == (reason, stage)
    assert out.source.offset == 7
    assert clf.seen == []


def test_overlong_text_truncates_or_rejects() -> None:
    _, value = chat_message("m-2", "conv-1", "one two three four five six seven eight nine")
    kept = handle_record(FakeClassifier(), _cfg(reject=False), _rec(value), received_wall=1.7e9, received_mono=0.0)
    assert isinstance(kept, EmotionEvent) and kept.truncated
    dropped = handle_record(FakeClassifier(), _cfg(reject=True), _rec(value), received_wall=1.7e9, received_mono=0.0)
    assert isinstance(dropped, DeadLetter) and dropped.reason == "text_too_long"


def test_an_inference_failure_is_dead_lettered() -> None:
    _, value = chat_message("m-3", "conv-1", "poison")
    out = handle_record(FakeClassifier(fail_on="poison"), _cfg(), _rec(value), received_wall=1.7e9, received_mono=0.0)
    assert isinstance(out, DeadLetter)
    assert (out.reason, out.stage, out.error_class) == ("inference_failed", "infer", "EngineError")


def test_the_baseline_group_is_not_the_workers() -> None:
    settings = load_settings()
    cfg = BaselineConfig.from_settings(settings)
    assert cfg.group_id == f"{settings.worker.app_id}-baseline"
    assert cfg.input_topic == settings.topics.input
