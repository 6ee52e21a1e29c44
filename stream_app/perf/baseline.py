"""The naive baseline: the consumer a team writes first, to measure the worker against.

A plain aiokafka consumer in a group (auto-commit off) that classifies each message on its own with a
Hugging Face ``transformers.pipeline("text-classification", top_k=None)`` (PyTorch, float32, the same
model folder as the worker), produces the same ``emotion_event.v1`` documents (cache level ``none``:
there is no cache) and dead-letters bad input with the same reasons as the worker. Offsets are
committed after the outputs of a fetched batch are acknowledged by the broker (at-least-once).

Deliberately naive, but not broken: one message per forward pass, no batching, no cache, no ONNX.
The forward pass runs in a thread so the event loop keeps heart-beating the group (a blocking call
in the loop would get the consumer evicted under load); messages are still handled one at a time.
Tokenisation happens inside the pipeline, so ``timings_ms.tokenize`` is 0 and ``infer`` includes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from stream_app.cache.keys import normalise
from stream_app.errors import DecodeError, EngineError, InputError, ModelError, TextTooLongError
from stream_app.kafka_config import aiokafka_auth
from stream_app.metrics import Metrics
from stream_app.records import (
    CacheInfo,
    DeadLetter,
    EmotionEvent,
    EventTimings,
    ModelInfo,
    SourceRef,
    decode_chat_message,
    event_id_for,
    rfc3339,
)
from stream_app.settings import Settings

__all__ = [
    "BaselineConfig",
    "BaselineStats",
    "Classifier",
    "NaiveClassifier",
    "RawRecord",
    "handle_record",
    "run_baseline",
]

_log = logging.getLogger(__name__)


class Classifier(Protocol):
    """Scores one text: probabilities in ``labels`` order, and the text's token count."""

    labels: tuple[str, ...]
    model_info: ModelInfo

    def n_tokens(self, text: str) -> int: ...

    def __call__(self, text: str) -> npt.NDArray[np.float32]: ...


class NaiveClassifier:
    """``transformers.pipeline("text-classification", top_k=None)`` on one text at a time."""

    def __init__(self, model_path: str, *, device: str = "cpu", num_threads: int = 0, max_length: int = 128) -> None:
        """Load the pipeline (offline: the model is a local folder or already cached).

        Raises:
            ModelError: the folder cannot be loaded as a sequence-classification checkpoint.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        import transformers

        from stream_app.inference.base import model_identity, resolve_num_threads

        torch.set_num_threads(resolve_num_threads(num_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self._pipe: Any = transformers.pipeline(
                "text-classification", model=model_path, tokenizer=model_path, top_k=None, device=device
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a text-classification pipeline from {model_path}: {exc}") from exc
        config = self._pipe.model.config
        id2label: dict[int, str] = dict(config.id2label or {})
        self.labels: tuple[str, ...] = tuple(id2label[i] for i in range(len(id2label)))
        self._position = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length
        try:
            name, version = model_identity(model_path)
        except ModelError:  # a hub id rather than a folder
            name, version = model_path, "unknown"
        self.model_info = ModelInfo(
            name=name,
            version=version,
            runtime=f"transformers-{transformers.__version__}/torch-{torch.__version__.split('+')[0]}",
            precision="fp32",
            device=str(self._pipe.device),
        )

    def n_tokens(self, text: str) -> int:
        return len(self._pipe.tokenizer(text, truncation=False)["input_ids"])

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        try:
            # softmax explicitly: the worker's engines apply it, and a config without problem_type would
            # otherwise decide for the pipeline
            out = self._pipe(text, truncation=True, max_length=self.max_length, function_to_apply="softmax")
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"pipeline failed: {exc}") from exc
        rows = out[0] if out and isinstance(out[0], list) else out
        probs = np.zeros(len(self.labels), dtype=np.float32)
        for row in rows:
            probs[self._position[row["label"]]] = float(row["score"])
        return probs


@dataclass(frozen=True)
class BaselineConfig:
    """Plain values the baseline needs (see :meth:`from_settings`)."""

    bootstrap_servers: str
    input_topic: str
    events_topic: str
    dead_letters_topic: str
    group_id: str
    client_id: str
    worker_id: str
    max_text_chars: int
    max_message_bytes: int
    overlong_reject: bool
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    producer_acks: Literal["all", 1] = "all"
    producer_linger_ms: int = 2
    fetch_max_records: int = 100
    security: Mapping[str, Any] = field(default_factory=dict)
    """aiokafka security arguments (:func:`stream_app.kafka_config.aiokafka_auth`); empty = PLAINTEXT."""

    @classmethod
    def from_settings(cls, settings: Settings, group_id: str | None = None) -> BaselineConfig:
        """The worker's settings; the group is ``<app_id>-baseline`` so it never joins the worker's group."""
        k, t, m = settings.kafka, settings.topics, settings.model
        return cls(
            bootstrap_servers=k.bootstrap_servers,
            security=aiokafka_auth(k),
            input_topic=t.input,
            events_topic=t.events,
            dead_letters_topic=t.dead_letters,
            group_id=group_id or f"{settings.worker.app_id}-baseline",
            client_id=f"{k.client_id}-baseline",
            worker_id=settings.worker.worker_id,
            max_text_chars=m.max_text_chars,
            max_message_bytes=m.max_message_bytes,
            overlong_reject=m.overlong == "reject",
            session_timeout_ms=int(k.session_timeout_s * 1000),
            heartbeat_interval_ms=int(k.heartbeat_interval_s * 1000),
            producer_acks="all" if k.producer_acks == "all" else 1,
            producer_linger_ms=k.producer_linger_ms,
        )


@dataclass(frozen=True)
class RawRecord:
    """One consumed Kafka record, as the baseline sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BaselineStats:
    consumed: int = 0
    events: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    commits: int = 0


def _dead(
    cfg: BaselineConfig, rec: RawRecord, reason: str, stage: str, error: BaseException, received: float
) -> DeadLetter:
    return DeadLetter.build(
        reason=reason,  # type: ignore[arg-type]
        stage=stage,  # type: ignore[arg-type]
        error=error,
        source=SourceRef(topic=rec.topic, partition=rec.partition, offset=rec.offset),
        raw_key=rec.key,
        raw_value=rec.value,
        max_raw_bytes=cfg.max_message_bytes,
        received_at=received,
        worker_id=cfg.worker_id,
    )


def handle_record(
    classifier: Classifier,
    cfg: BaselineConfig,
    rec: RawRecord,
    *,
    received_wall: float,
    received_mono: float,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> EmotionEvent | DeadLetter:
    """Decode, validate and classify one record, the way the worker does but one message at a time."""
    t0 = clock()
    if rec.value is not None and len(rec.value) > cfg.max_message_bytes:
        too_large = DecodeError(f"{len(rec.value)} bytes is over the limit")
        return _dead(cfg, rec, "too_large", "decode", too_large, received_wall)
    try:
        message = decode_chat_message(rec.value)
    except InputError as exc:
        stage = "decode" if isinstance(exc, DecodeError) else "validate"
        return _dead(cfg, rec, exc.reason, stage, exc, received_wall)
    text = message.text
    if len(normalise(text)) > cfg.max_text_chars:
        if cfg.overlong_reject:
            error = TextTooLongError(f"{len(text)} characters is over max_text_chars")
            return _dead(cfg, rec, "text_too_long", "validate", error, received_wall)
        text = text[: cfg.max_text_chars]
    t1 = clock()
    truncated = classifier.n_tokens(text) > getattr(classifier, "max_length", 1 << 30)
    if truncated and cfg.overlong_reject:
        error = TextTooLongError("text is over the token limit")
        return _dead(cfg, rec, "text_too_long", "tokenize", error, received_wall)
    try:
        probs = classifier(text)
    except EngineError as exc:
        return _dead(cfg, rec, "inference_failed", "infer", exc, received_wall)
    t2 = clock()
    top = int(np.argmax(probs))
    scores = {label: float(p) for label, p in zip(classifier.labels, probs, strict=True)}
    t3 = clock()
    return EmotionEvent(
        event_id=event_id_for(rec.topic, rec.partition, rec.offset),
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        user_id=message.user_id,
        label=classifier.labels[top],
        score=float(probs[top]),
        scores=scores,
        model=classifier.model_info,
        cache=CacheInfo(hit=False, level="none"),
        truncated=truncated,
        timings_ms=EventTimings(
            decode=(t1 - t0) * 1e3,
            cache=0.0,
            queue_wait=max(0.0, t0 - received_mono) * 1e3,
            tokenize=0.0,
            infer=(t2 - t1) * 1e3,
            postprocess=(t3 - t2) * 1e3,
            total=max(0.0, clock() - received_mono) * 1e3,
        ),
        source=SourceRef(topic=rec.topic, partition=rec.partition, offset=rec.offset),
        sent_at=rfc3339(message.sent_at.timestamp()),
        received_at=rfc3339(received_wall),
        emitted_at=rfc3339(wall_clock()),
        traceparent=message.traceparent,
    )


async def run_baseline(
    cfg: BaselineConfig,
    classifier: Classifier,
    *,
    metrics: Metrics | None = None,
    stop: asyncio.Event | None = None,
    max_messages: int | None = None,
) -> BaselineStats:
    """Consume, classify one by one, produce, commit; until ``stop`` is set or ``max_messages`` are done.

    Raises:
        aiokafka.errors.KafkaError: the broker failed; nothing of the current batch is committed.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    metrics = metrics or Metrics()
    stop = stop or asyncio.Event()
    stats = BaselineStats()
    engine_label = "pipeline-fp32"
    consumer = AIOKafkaConsumer(
        cfg.input_topic,
        bootstrap_servers=cfg.bootstrap_servers,
        group_id=cfg.group_id,
        client_id=cfg.client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        **cfg.security,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.bootstrap_servers,
        client_id=cfg.client_id,
        acks=cfg.producer_acks,
        linger_ms=cfg.producer_linger_ms,
        **cfg.security,
    )
    await producer.start()
    await consumer.start()
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=cfg.fetch_max_records)
            received_wall, received_mono = time.time(), time.monotonic()
            pending: list[tuple[asyncio.Future[Any], float]] = []
            commit: dict[Any, Any] = {}
            for tp, records in batch.items():
                for r in records:
                    rec = RawRecord(r.topic, r.partition, r.offset, r.key, r.value)
                    stats.consumed += 1
                    metrics.messages_total.inc()
                    call = functools.partial(
                        handle_record, classifier, cfg, rec, received_wall=received_wall, received_mono=received_mono
                    )
                    out = await loop.run_in_executor(None, call)
                    if isinstance(out, EmotionEvent):
                        metrics.inference_seconds.labels(engine_label).observe(out.timings_ms.infer / 1e3)
                        key = out.conversation_id.encode()
                        fut = await producer.send(cfg.events_topic, value=out.to_json(), key=key)
                        stats.events += 1
                    else:
                        metrics.dead_letters_total.labels(out.reason).inc()
                        fut = await producer.send(cfg.dead_letters_topic, value=out.to_json(), key=rec.key)
                        stats.dead_letters[out.reason] = stats.dead_letters.get(out.reason, 0) + 1
                    pending.append((fut, received_mono if isinstance(out, EmotionEvent) else -1.0))
                    commit[TopicPartition(tp.topic, tp.partition)] = OffsetAndMetadata(r.offset + 1, "")
            if not pending:
                continue
            # commit only after the broker acknowledged every output of this fetch (at-least-once)
            await asyncio.gather(*(f for f, _ in pending))
            now = time.monotonic()
            for _, t in pending:
                if t >= 0:
                    metrics.events_total.inc()
                    metrics.end_to_end_seconds.observe(now - t)
            await consumer.commit(commit)
            stats.commits += 1
            if max_messages is not None and stats.consumed >= max_messages:
                break
    finally:
        await consumer.stop()
        await producer.stop()
    return stats
