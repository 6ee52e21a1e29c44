"""OpenTelemetry spans per inference batch, linked to each message's trace context (optional).

Off by default: with ``EMOTION_STREAM_TRACING__OTLP_ENDPOINT`` empty, :func:`batch_tracer` returns None,
the classifier skips its one ``if tracer is not None`` check per batch, and no ``opentelemetry`` module
is ever imported (``pip install emotion-stream[otel]`` brings them).

On, each inference batch becomes one span, as OpenTelemetry's messaging conventions describe batch
processing: a ``process <input topic>`` span of kind CONSUMER, a root of its own trace, with one *link*
per message to the trace context the message came with (``traceparent``/``tracestate`` from its Kafka
headers or body, :class:`~stream_app.core.headers.TraceContext`). A message is in one batch but a batch
has many messages, so links, not parenthood, are what connect them; a trace backend shows the batch
from each message's trace and every message from the batch. Attributes: batch size, padded and real
tokens, the engine, why the batch closed, and its queue wait (``emotion.*``), with the messaging ones
(``messaging.system``, ``messaging.destination.name``, ``messaging.batch.message_count``...).

The span covers the forward pass and the post-processing; it is made after the batch, from times the
classifier measured anyway, so tracing adds no clock reading or context switch to the batch itself.
Spans are exported by the SDK's batch processor on its own thread through OTLP/HTTP, with a bounded
queue (full: spans are dropped, never waited for).

No Faust or Kafka client import here: the core calls :meth:`BatchTracer.on_batch`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stream_app.settings import TracingSettings

if TYPE_CHECKING:
    from stream_app.core.classifier import BatchStats
    from stream_app.core.headers import TraceContext
    from stream_app.core.slots import Slot

__all__ = ["SPAN_NAME_PREFIX", "BatchTracer", "batch_tracer", "parse_otlp_headers"]

_log = logging.getLogger(__name__)

SPAN_NAME_PREFIX = "process"
"""Span name: ``process <input topic>`` (OpenTelemetry messaging conventions: ``{operation} {destination}``)."""


def parse_otlp_headers(value: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` (OTEL_EXPORTER_OTLP_HEADERS' format) as a dict; blanks are skipped."""
    out: dict[str, str] = {}
    for item in value.split(","):
        key, eq, val = item.partition("=")
        if eq and key.strip():
            out[key.strip()] = val.strip()
    return out


class BatchTracer:
    """Turns finished inference batches into spans (see the module docstring).

    Args:
        tracer: An OpenTelemetry ``Tracer``.
        engine: The engine label (``onnx-int8``...), an attribute of every span.
        consumer_group: The Kafka consumer group (``messaging.consumer.group.name``).
        provider: The SDK ``TracerProvider`` to flush and shut down at :meth:`shutdown` (None: the caller's).
        clock_ns: Wall clock in nanoseconds since the epoch (injected in tests).
    """

    def __init__(
        self,
        tracer: Any,
        *,
        engine: str,
        consumer_group: str,
        provider: Any = None,
        clock_ns: Any = time.time_ns,
    ) -> None:
        from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState

        self._tracer = tracer
        self._provider = provider
        self.failures = 0
        """Batches whose span could not be made."""
        self._clock_ns = clock_ns
        self._link = Link
        self._span_context = SpanContext
        self._trace_flags = TraceFlags
        self._trace_state = TraceState
        self._kind = SpanKind.CONSUMER
        self._constant: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": consumer_group,
            "emotion.engine": engine,
        }

    def _link_to(self, trace: TraceContext) -> Any:
        state = self._trace_state.from_header([trace.tracestate]) if trace.tracestate else None
        context = self._span_context(
            trace_id=int(trace.trace_id, 16),
            span_id=int(trace.parent_id, 16),
            is_remote=True,
            trace_flags=self._trace_flags(int(trace.flags, 16)),
            trace_state=state,
        )
        return self._link(context)

    def on_batch(self, leaders: Sequence[Slot], stats: BatchStats) -> None:
        """One finished batch: ``leaders`` are the messages inferred (each with its ``trace``), ``stats``
        its measurements; called on the event loop right after the batch's post-processing.

        Never raises: a tracing failure costs the span (logged once), never the batch or the worker.
        """
        try:
            self._span(leaders, stats)
        except Exception as exc:  # noqa: BLE001 -- tracing is optional; the pipeline must not stop for it
            self.failures += 1
            if self.failures == 1:
                _log.warning("tracing: a batch span could not be made (%r); later failures are not logged", exc)

    def _span(self, leaders: Sequence[Slot], stats: BatchStats) -> None:
        end = self._clock_ns()
        start = end - int((stats.infer_s + stats.postprocess_s) * 1e9)
        topic = leaders[0].chunk.topic if leaders else ""
        links = [self._link_to(s.trace) for s in leaders if s.trace is not None]
        attributes = {
            **self._constant,
            "messaging.destination.name": topic,
            "messaging.batch.message_count": stats.size,
            "emotion.batch.id": stats.batch_id,
            "emotion.batch.size": stats.size,
            "emotion.batch.padded_tokens": stats.padded_tokens,
            "emotion.batch.real_tokens": stats.real_tokens,
            "emotion.batch.token_budget": stats.token_budget,
            "emotion.batch.closed_reason": stats.closed_reason,
            "emotion.batch.queue_wait_s": stats.queue_wait_s,
            "emotion.batch.infer_s": stats.infer_s,
            "emotion.batch.traced_messages": len(links),
        }
        span = self._tracer.start_span(
            f"{SPAN_NAME_PREFIX} {topic}", kind=self._kind, links=links, attributes=attributes, start_time=start
        )
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout) and stop the exporter thread."""
        if self._provider is not None:
            self._provider.shutdown()


def batch_tracer(
    settings: TracingSettings,
    *,
    engine: str,
    consumer_group: str,
    worker_id: str,
    max_links: int = 128,
    exporter: Any = None,
) -> BatchTracer | None:
    """The batch tracer the settings ask for, or None when tracing is off (nothing imported then).

    Args:
        settings: The tracing settings (``otlp_endpoint`` empty: off, unless ``exporter`` is given).
        engine: The engine label of the spans.
        consumer_group: The worker's consumer group.
        worker_id: ``service.instance.id`` of the spans.
        max_links: Links kept per span (the largest batch: one per message).
        exporter: A span exporter to use instead of OTLP/HTTP (tests: the SDK's in-memory exporter).
    """
    if not settings.otlp_endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint,
            headers=parse_otlp_headers(settings.otlp_headers.get_secret_value()) or None,
            timeout=settings.otlp_timeout_s,
        )
    resource = Resource.create({"service.name": settings.service_name, "service.instance.id": worker_id})
    # our own provider, not the global one: the worker's spans never depend on what a library set up
    provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_links=max(1, max_links)))
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=settings.max_queue_spans,
            max_export_batch_size=min(512, settings.max_queue_spans),
            export_timeout_millis=settings.otlp_timeout_s * 1000,
        )
    )
    _log.info("tracing: a span per batch to %s", settings.otlp_endpoint or type(exporter).__name__)
    return BatchTracer(
        provider.get_tracer("stream_app.tracing"),
        engine=engine,
        consumer_group=consumer_group,
        provider=provider,
    )
