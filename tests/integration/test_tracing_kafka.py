"""A real worker with an OTLP endpoint configured exports one span per batch, linked to each message's
trace context (the endpoint is a loopback HTTP server that records what an OpenTelemetry Collector
would receive)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from stream_app.devtools.clients import chat_message
from tests.integration.conftest import make_topics
from tests.integration.helpers import Until, collect
from tests.integration.test_cloudevents_kafka import _produce
from tests.unit.test_tracing import collector

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["collector"]  # the fixture, imported to be used here


def test_a_worker_with_an_otlp_endpoint_exports_batch_spans_linked_to_the_messages(
    kafka: Any, spawn_worker: Any, collector: Any
) -> None:
    endpoint, received = collector
    topics = make_topics(kafka, partitions=2)
    worker = spawn_worker(topics, EMOTION_STREAM_TRACING__OTLP_ENDPOINT=endpoint)
    worker.wait_ready()
    sent = {}
    records = []
    for n in range(30):
        trace_id, parent_id = f"{n + 7:032x}", f"{n + 9:016x}"
        key, value = chat_message(f"m-{n}", f"c-{n % 3}", f"a different message, number {n}")
        records.append((key, value, [("traceparent", f"00-{trace_id}-{parent_id}-01".encode())]))
        sent[(trace_id, parent_id)] = n
    asyncio.run(_produce(kafka.bootstrap_servers, topics.input, records))
    collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: 30}, distinct_ids=True), 120)

    linked: set[tuple[str, str]] = set()
    sizes = 0
    deadline = time.monotonic() + 30  # the batch processor exports every few seconds
    while time.monotonic() < deadline and linked != set(sent):
        time.sleep(0.5)
        linked, sizes = set(), 0
        for _, _, body in list(received):
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                for span in (s for ss in rs.scope_spans for s in ss.spans):
                    assert span.name == f"process {topics.input}"
                    attrs = {a.key: a.value for a in span.attributes}
                    sizes += attrs["emotion.batch.size"].int_value
                    linked |= {(link.trace_id.hex(), link.span_id.hex()) for link in span.links}
    assert linked == set(sent), worker.log_tail()
    assert sizes == 30
