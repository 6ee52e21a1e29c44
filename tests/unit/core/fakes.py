"""Fakes for driving the core without a broker or a model: encoder, engine, records and a sink."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from stream_app.cache.admission import AlwaysAdmit
from stream_app.cache.keys import ModelIdentity
from stream_app.cache.lru import TtlLru
from stream_app.cache.tiered import L1Entry, ResultCache
from stream_app.core.classifier import ClassifierConfig
from stream_app.core.crash_ledger import CrashLedger
from stream_app.core.emitter import EmitterConfig
from stream_app.core.intake import Intake
from stream_app.core.pipeline import Pipeline
from stream_app.core.slots import OutRecord
from stream_app.errors import EngineError, OutputRejectedError
from stream_app.inference.base import EngineInfo
from stream_app.inference.tokenize import Encoded, EncodedBatch, pad
from stream_app.metrics import Metrics

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
POISON_ID = 999
IDENTITY = ModelIdentity(name="m", version="1", runtime="torch", precision="fp32")


class FakeEncoder:
    """One token per word (+2 specials); the word "poison" becomes POISON_ID; "unencodable" raises."""

    def __init__(self, max_length: int = 16) -> None:
        self.max_length = max_length
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        self.calls.append(len(texts))
        if any("unencodable" in t for t in texts):
            raise ValueError("tokenizer refused a text")
        out = []
        for text in texts:
            ids = [101] + [POISON_ID if w == "poison" else 1000 + len(w) for w in text.split()] + [102]
            truncated = len(ids) > self.max_length
            ids = ids[: self.max_length]
            out.append(Encoded(input_ids=tuple(ids), n_tokens=len(ids), truncated=truncated))
        return out

    def pad(self, items: Sequence[Encoded]) -> EncodedBatch:
        return pad(items)


class FakeEngine:
    """Deterministic probabilities from the ids; raises on a row holding POISON_ID."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            kind="torch", runtime="fake", precision="fp32", device="cpu", model_name="m", model_version="1"
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS

    def predict(self, batch: EncodedBatch) -> np.ndarray:
        import time

        self.calls.append(batch.size)
        if self.delay_s:
            time.sleep(self.delay_s)
        if (batch.input_ids == POISON_ID).any():
            raise EngineError("poison row")
        rows = []
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            seed = hashlib.sha256(ids[mask.astype(bool)].tobytes()).digest()
            logits = np.frombuffer(seed[: len(LABELS)], dtype=np.uint8).astype(np.float32) / 40.0
            e = np.exp(logits - logits.max())
            rows.append(e / e.sum())
        return np.asarray(rows, dtype=np.float32)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Rec:
    """A fetched record (what aiokafka's ConsumerRecord offers the core)."""

    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    timestamp: int = 1_767_225_600_000
    headers: tuple[tuple[str, bytes], ...] = ()


def raw(i: int, text: str, conv: str = "c", **extra: Any) -> bytes:
    doc = {
        "message_id": f"m{i}",
        "conversation_id": conv,
        "user_id": "u",
        "text": text,
        "sent_at": "2026-01-01T00:00:00Z",
        **extra,
    }
    return orjson.dumps(doc)


@dataclass
class ListSink:
    """Collects what is sent; futures resolve at once unless held, or fail when told to."""

    sent: list[tuple[str, OutRecord]] = field(default_factory=list)
    pending: list[asyncio.Future[int | None]] = field(default_factory=list)
    hold: bool = False
    fail_with: BaseException | None = None
    reject_when: Any = None  # predicate on an OutRecord: the broker refuses a batch holding it
    batch_size: int = 3

    async def send(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        loop = asyncio.get_running_loop()
        out: list[tuple[list[int], asyncio.Future[int | None]]] = []
        for start in range(0, len(records), self.batch_size):
            idx = list(range(start, min(len(records), start + self.batch_size)))
            fut: asyncio.Future[int | None] = loop.create_future()
            part = [records[i] for i in idx]
            if self.fail_with is not None:
                fut.set_exception(self.fail_with)
            elif self.reject_when is not None and any(self.reject_when(topic, r) for r in part):
                fut.set_exception(OutputRejectedError("record too large"))
            else:
                self.sent.extend((topic, r) for r in part)
                if self.hold:
                    self.pending.append(fut)
                else:
                    fut.set_result(None)
            out.append((idx, fut))
        return out

    def docs(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for t, r in self.sent if t == topic]


class DictL2:
    def __init__(self) -> None:
        self.data: dict[tuple[int, bytes], bytes] = {}

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.data.get((partition, k)) for k in keys]

    def put(self, partition: int, key: bytes, value: bytes) -> bool:
        self.data[(partition, key)] = value
        return True


def build(
    sink: ListSink,
    *,
    engine: FakeEngine | None = None,
    encoder: FakeEncoder | None = None,
    l1: bool = True,
    l2: DictL2 | None = None,
    max_in_flight: int = 256,
    ledger: CrashLedger | None = None,
    fatal: list[BaseException] | None = None,
    metrics: Metrics | None = None,
    overlong_reject: bool = False,
    max_record_bytes: int = 1 << 20,
    tracer: Any = None,
    **classifier: Any,
) -> Pipeline:
    metrics = metrics or Metrics()
    cache = ResultCache(
        l1=TtlLru[bytes, L1Entry](max_entries=100, ttl_s=60.0) if l1 else None,
        l2=l2,
        admission=AlwaysAdmit(),
        l2_ttl_s=600.0,
        n_labels=len(LABELS),
        metrics=metrics,
    )
    cfg: dict[str, Any] = dict(
        max_batch_size=8,
        max_batch_tokens=4096,
        max_wait_s=0.005,
        capacity=1024,
        adaptive=False,
        overlong_reject=overlong_reject,
    )
    cfg.update(classifier)
    errors = fatal if fatal is not None else []
    return Pipeline(
        engine=engine or FakeEngine(),  # type: ignore[arg-type]
        encoder=encoder or FakeEncoder(),  # type: ignore[arg-type]
        sink=sink,
        intake=Intake(max_message_bytes=10_000, max_text_chars=500, overlong_reject=overlong_reject, identity=IDENTITY),
        cache=cache,
        classifier_config=ClassifierConfig(**cfg),
        emitter_config=EmitterConfig(
            events_topic="events",
            dead_letters_topic="dlq",
            metrics_topic="metrics",
            worker_id="w",
            labels=LABELS,
            model={"name": "m", "version": "1", "runtime": "fake", "precision": "fp32", "device": "cpu"},
            engine="torch-fp32",
            max_record_bytes=max_record_bytes,
        ),
        max_in_flight=max_in_flight,
        metrics=metrics,
        on_fatal=errors.append,
        ledger=ledger,
        tracer=tracer,
    )
