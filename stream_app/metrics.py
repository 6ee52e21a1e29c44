"""Every Prometheus collector of the worker, in one place.

Seconds are the base unit (explicit buckets from 100 µs to 10 s); batch size and token counts use
power-of-two buckets. Labels are a small fixed set (``stage``, ``reason``, ``level``, ``result``,
``engine``), never one per message or user. Collectors live in a :class:`Metrics` object with its own
registry, so tests (and several workers in one process) never share state.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["LATENCY_BUCKETS_S", "STAGES", "Metrics", "serve_metrics"]

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_POW2 = tuple(float(2**i) for i in range(0, 15))
STAGES = ("decode", "cache", "queue_wait", "tokenize", "infer", "postprocess", "produce")


class Metrics:
    """The worker's collectors, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "emotion_stage_seconds",
            "Time spent in one pipeline stage: per fetched chunk (decode, cache, tokenize), per batch (infer, "
            "postprocess of a completion) or per produced group (produce).",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "emotion_queue_wait_seconds",
            "Per batch: how long its oldest message waited between tokenisation and the batch starting.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "emotion_inference_seconds",
            "Time of one batch's forward pass (excluding tokenisation).",
            ["engine"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "emotion_end_to_end_seconds",
            "Per produced group: from reading its oldest message to the broker acknowledging its output (an "
            "upper bound for every message of the group).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram("emotion_batch_size", "Messages per inference batch.", buckets=_POW2, registry=r)
        self.batch_tokens = Histogram(
            "emotion_batch_tokens", "Padded tokens per inference batch.", buckets=_POW2, registry=r
        )
        self.batch_real_tokens = Histogram(
            "emotion_batch_real_tokens",
            "Real (unpadded) tokens per inference batch.",
            buckets=_POW2,
            registry=r,
        )
        self.messages_total = Counter("emotion_messages_total", "Messages read from the input topic.", registry=r)
        self.events_total = Counter("emotion_events_total", "Emotion events acknowledged by the broker.", registry=r)
        self.dead_letters_total = Counter(
            "emotion_dead_letters_total",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.errors_total = Counter(
            "emotion_errors_total",
            "Errors by stage (a failed batch, a produce error).",
            ["stage"],
            registry=r,
        )
        self.cache_lookups_total = Counter(
            "emotion_cache_lookups_total",
            "Cache lookups by level and result (hit or miss).",
            ["level", "result"],
            registry=r,
        )
        self.cache_evictions_total = Counter(
            "emotion_cache_evictions_total",
            "Cache entries removed, by level and reason.",
            ["level", "reason"],
            registry=r,
        )
        self.engine_fallbacks_total = Counter(
            "emotion_engine_fallbacks_total",
            "Engines passed over or switched away from, by reason code.",
            ["reason"],
            registry=r,
        )
        self.oom_splits_total = Counter(
            "emotion_oom_splits_total", "Batches split after a device out-of-memory error.", registry=r
        )
        self.in_flight = Gauge("emotion_in_flight_messages", "Messages read but not yet acknowledged.", registry=r)
        self.queue_depth = Gauge("emotion_batch_queue_depth", "Messages waiting to be batched.", registry=r)
        self.token_budget = Gauge("emotion_batch_token_budget", "Current padded-token budget of a batch.", registry=r)
        self.cache_entries = Gauge("emotion_cache_entries", "Entries held by a cache level.", ["level"], registry=r)
        self.process_cpu_percent = Gauge(
            "emotion_process_cpu_percent", "Worker CPU use, sampled by the profiler.", registry=r
        )
        self.process_rss_bytes = Gauge(
            "emotion_process_rss_bytes", "Worker resident memory, sampled by the profiler.", registry=r
        )
        self.gpu_utilization_percent = Gauge(
            "emotion_gpu_utilization_percent", "GPU utilisation (pynvml), when a GPU is used.", registry=r
        )
        self.gpu_memory_used_bytes = Gauge(
            "emotion_gpu_memory_used_bytes", "GPU memory in use (pynvml), when a GPU is used.", registry=r
        )
        self.engine_info = Gauge(
            "emotion_engine_info",
            "The engine in use (value 1).",
            ["engine", "device", "model_version"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "emotion_assigned_partitions",
            "Input partitions assigned to this worker (0 until it joined the group: not ready).",
            registry=r,
        )
        self.cold_start_seconds = Gauge(
            "emotion_cold_start_seconds",
            "Start-up, by phase: import (process start to the worker's first line: interpreter and libraries), "
            "engine_import, engine_load and warmup (the model, in a thread beside the rest), ready and "
            "first_chunk (process start to ready and to the first input chunk taken).",
            ["phase"],
            registry=r,
        )
        self.offset_resets_total = Counter(
            "emotion_offset_resets_total",
            "Input offsets that moved backwards past what this worker had seen (an out-of-range reset or a "
            "rewind): everything from the new position is processed, nothing skipped.",
            ["partition"],
            registry=r,
        )
        self.consumer_lag_messages = Gauge(
            "emotion_consumer_lag_messages",
            "Input records not yet processed, per partition: read and unacknowledged plus not yet read "
            "(up to the last stable offset; transaction markers are not counted).",
            ["partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "emotion_consumer_lag_seconds",
            "Age of the oldest unprocessed input record, per partition (0 when caught up).",
            ["partition"],
            registry=r,
        )
        self.partition_changes_total = Counter(
            "emotion_partitions_changes_total",
            "Times the input topic's partition count changed while the worker ran.",
            registry=r,
        )
        self.l2_rebuilds_total = Counter(
            "emotion_l2_rebuilds_total",
            "Local table partitions discarded and rebuilt from their changelog, by reason.",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("emotion_ready", "1 when the worker is ready (see /readyz), else 0.", registry=r)
        self.conversation_alerts_total = Counter(
            "emotion_conversation_alerts_total",
            "escalation.v1 records produced, by rule (once per episode of a conversation).",
            ["rule"],
            registry=r,
        )
        self.conversation_key_mismatches_total = Counter(
            "emotion_conversation_key_mismatches_total",
            "Classified input records whose Kafka key is not their conversation_id: the contract's key, which "
            "keeps a conversation in one partition; otherwise its state is split across partitions.",
            registry=r,
        )
        self.conversations_active = Gauge(
            "emotion_conversations_active",
            "Conversations whose state this worker holds (counted by the expiry sweep).",
            registry=r,
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on a daemon thread; returns the server (``.server_port``) and its thread."""
    return start_http_server(port, addr=host, registry=metrics.registry)
