"""The transport-free pipeline, assembled from the settings.

The one place that turns :class:`~stream_app.settings.Settings` and a loaded
:class:`~stream_app.service.Runtime` into a :class:`~stream_app.core.pipeline.Pipeline` with its cache, crash
ledger, batch tracer and conversation stage. The worker calls it with its Kafka sink and Faust tables;
``benchmarks/gpu_worker.py`` with an in-memory sink and store, so what it measures is what the worker runs.
Imports neither Faust nor a Kafka client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stream_app.cache.admission import Admission, SecondSightingAdmission
from stream_app.cache.keys import ModelIdentity
from stream_app.cache.lru import TtlLru
from stream_app.cache.tiered import L1Entry, L2Store, ResultCache
from stream_app.conversations.rules import load_rules
from stream_app.conversations.stage import ConversationStage, StateStore
from stream_app.conversations.tracker import ConversationTracker
from stream_app.core.classifier import ClassifierConfig
from stream_app.core.crash_ledger import CrashLedger
from stream_app.core.emitter import EmitterConfig, Sink
from stream_app.core.intake import Intake
from stream_app.core.pipeline import Pipeline
from stream_app.metrics import Metrics
from stream_app.service import Runtime
from stream_app.settings import Settings
from stream_app.tracing import BatchTracer, batch_tracer

__all__ = ["Assembly", "build_pipeline", "conversation_stage"]


@dataclass
class Assembly:
    """What :func:`build_pipeline` built: the pipeline and the parts its owner keeps a hand on."""

    pipeline: Pipeline
    identity: ModelIdentity
    l1: TtlLru[bytes, L1Entry] | None
    tracer: BatchTracer | None
    conversations: ConversationStage | None


def conversation_stage(
    settings: Settings, labels: tuple[str, ...], store: StateStore, metrics: Metrics
) -> ConversationStage:
    """The conversation stage configured by ``settings.conversations`` over ``store`` (the worker's is a
    RocksDB-backed Faust table). Raises :class:`~stream_app.errors.ConfigError` for an invalid rules file."""
    c = settings.conversations
    tracker = ConversationTracker(
        labels=labels,
        rules=load_rules(c.rules_file, labels=labels),
        window_s=c.window_s,
        window_pane_s=c.window_pane_s,
        allowed_lateness_s=c.allowed_lateness_s,
        mood_half_life_s=c.mood_half_life_s,
        recent_messages=c.recent_messages,
        dominant_min_margin=c.dominant_min_margin,
        emit_interval_s=c.emit_interval_s,
        ttl_s=c.ttl_s,
        max_future_skew_s=c.max_future_skew_s,
    )
    return ConversationStage(
        tracker, store, states_topic=settings.topics.conversations, alerts_topic=settings.topics.alerts, metrics=metrics
    )


def build_pipeline(
    settings: Settings,
    rt: Runtime,
    *,
    sink: Sink,
    metrics: Metrics,
    on_fatal: Callable[[BaseException], None],
    l2: L2Store | None = None,
    conversation_store: StateStore | None = None,
    state_dir: Path | None = None,
) -> Assembly:
    """Assemble the pipeline as the worker runs it.

    Args:
        settings: Batching, model limits, caches, topics and worker settings.
        rt: The loaded engine and tokenizer (:func:`stream_app.service.build_runtime`).
        sink: Where output records go (the worker's: Kafka).
        metrics: The process's Prometheus collectors.
        on_fatal: Called once when the engine, device or broker is unusable.
        l2: The L2 cache store, used when ``cache.l2_enabled``.
        conversation_store: The conversation state store; with it (and ``conversations.enabled``) the
            conversation stage follows the emitter.
        state_dir: Where the crash ledger lives (default ``worker.state_dir``).
    """
    s = settings
    b, m, c = s.batching, s.model, s.cache
    info = rt.engine.info
    identity = ModelIdentity(
        name=info.model_name,
        version=info.model_version,
        runtime=info.kind,
        precision=info.precision,
        max_length_tokens=rt.encoder.max_length,
    )
    l1: TtlLru[bytes, L1Entry] | None = TtlLru(max_entries=c.l1_max_entries, ttl_s=c.l1_ttl_s) if c.l1_enabled else None
    admission: Admission | None = None
    if c.admission == "second_sighting":
        admission = SecondSightingAdmission(capacity=max(1024, c.l2_max_entries_per_partition))
    cache = ResultCache(
        l1=l1,
        l2=l2 if c.l2_enabled else None,
        admission=admission,
        l2_ttl_s=c.l2_ttl_s,
        n_labels=len(rt.engine.labels),
        metrics=metrics,
    )
    engine_name = f"{info.kind}-{info.precision}"
    tracer = batch_tracer(
        s.tracing,
        engine=engine_name,
        consumer_group=s.worker.app_id,
        worker_id=s.worker.worker_id,
        max_links=b.max_batch_size,
    )
    ledger = CrashLedger(
        (state_dir or s.worker.state_dir) / "crash-ledger.json", max_strikes=s.worker.max_record_crashes
    )
    pipeline = Pipeline(
        engine=rt.engine,
        encoder=rt.encoder,
        sink=sink,
        intake=Intake(
            max_message_bytes=m.max_message_bytes,
            max_text_chars=m.max_text_chars,
            overlong_reject=m.overlong == "reject",
            identity=identity,
        ),
        cache=cache,
        classifier_config=ClassifierConfig(
            max_batch_size=b.max_batch_size,
            max_batch_tokens=b.max_batch_tokens,
            max_wait_s=b.max_wait_ms / 1000.0,
            capacity=2 * b.queue_capacity + s.kafka.max_poll_records,
            group_by_length=b.group_by_length,
            adaptive=b.adaptive,
            target_batch_s=b.target_batch_p99_ms / 1000.0,
            min_batch_tokens=b.min_batch_tokens,
            max_batch_tokens_ceiling=b.max_batch_tokens_ceiling,
            overlong_reject=m.overlong == "reject",
            concurrent_batches=rt.concurrent_batches,
        ),
        emitter_config=EmitterConfig(
            events_topic=s.topics.events,
            dead_letters_topic=s.topics.dead_letters,
            metrics_topic=s.topics.metrics,
            worker_id=s.worker.worker_id,
            labels=tuple(rt.engine.labels),
            model={
                "name": info.model_name,
                "version": info.model_version,
                "runtime": info.runtime,
                "precision": info.precision,
                "device": info.device,
            },
            engine=engine_name,
            max_record_bytes=s.kafka.max_request_size_bytes,
            max_raw_bytes=m.max_message_bytes,
        ),
        max_in_flight=b.queue_capacity,
        metrics=metrics,
        on_fatal=on_fatal,
        ledger=ledger,
        tracer=tracer,
    )
    conversations = None
    if conversation_store is not None and s.conversations.enabled:
        conversations = conversation_stage(s, tuple(rt.engine.labels), conversation_store, metrics)
        pipeline.emitter.stages.append(conversations)
    return Assembly(pipeline=pipeline, identity=identity, l1=l1, tracer=tracer, conversations=conversations)
