"""OpenTelemetry spans per batch: through the core with the SDK's in-memory exporter, over OTLP/HTTP to a
local endpoint, and nothing of OpenTelemetry imported when tracing is off."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from stream_app.settings import TracingSettings, load_settings
from stream_app.tracing import batch_tracer, parse_otlp_headers
from tests.unit.core.fakes import FakeEngine, ListSink, Rec, build, raw

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _trace(n: int) -> tuple[str, str]:
    return f"{n + 1:032x}", f"{n + 0xA0:016x}"


def _records() -> tuple[list[Rec], dict[tuple[str, str], tuple[str, str | None]]]:
    """20 messages: traceparent headers (some with tracestate, some unsampled), body-only traceparents and
    none; returns them and {(trace_id, parent_id): (flags, tracestate)} of every traced one."""
    recs: list[Rec] = []
    traced: dict[tuple[str, str], tuple[str, str | None]] = {}
    for i in range(20):
        trace_id, parent_id = _trace(i)
        flags = "00" if i % 5 == 4 else "01"
        traceparent = f"00-{trace_id}-{parent_id}-{flags}"
        text = f"message {i} " + "word " * (i % 7)
        if i % 4 == 0:
            recs.append(Rec(i, raw(i, text)))  # no trace context
        elif i % 4 == 1:
            recs.append(Rec(i, raw(i, text, traceparent=traceparent)))
            traced[(trace_id, parent_id)] = (flags, None)
        elif i % 4 == 2:
            recs.append(Rec(i, raw(i, text), headers=(("traceparent", traceparent.encode()), ("tracestate", b"k=v1"))))
            traced[(trace_id, parent_id)] = (flags, "k=v1")
        else:
            recs.append(Rec(i, raw(i, text), headers=(("traceparent", traceparent.encode()),)))
            traced[(trace_id, parent_id)] = (flags, None)
    return recs, traced


async def test_one_span_per_batch_with_a_link_to_each_messages_trace_context_and_batch_attributes() -> None:
    exporter = InMemorySpanExporter()
    tracer = batch_tracer(
        TracingSettings(), engine="torch-fp32", consumer_group="g1", worker_id="w-7", max_links=8, exporter=exporter
    )
    assert tracer is not None
    sink = ListSink()
    p = build(sink, engine=FakeEngine(delay_s=0.02), tracer=tracer, max_batch_size=8)
    assert p.classifier.tracer is tracer
    recs, traced = _records()
    await p.start()
    try:
        await p.feed("chat.in", {0: recs[:10], 1: recs[10:]})
        assert await p.drain(10.0)
    finally:
        await p.stop()
    tracer.shutdown()  # flushes the batch processor
    spans = exporter.get_finished_spans()
    batches = sink.docs("metrics")
    assert len(spans) == len(batches) >= 3  # 20 texts, batches of at most 8
    assert sum(s.attributes["emotion.batch.size"] for s in spans) == 20 == sum(d["size"] for d in batches)

    links: dict[tuple[str, str], Any] = {}
    for span in spans:
        a = span.attributes
        assert span.name == "process chat.in" and span.kind is SpanKind.CONSUMER
        assert span.parent is None  # a root: messages are linked, not parents
        assert (a["messaging.system"], a["messaging.destination.name"]) == ("kafka", "chat.in")
        assert (a["messaging.consumer.group.name"], a["emotion.engine"]) == ("g1", "torch-fp32")
        assert a["messaging.batch.message_count"] == a["emotion.batch.size"] <= 8
        assert a["emotion.batch.padded_tokens"] >= a["emotion.batch.real_tokens"] > 0
        assert a["emotion.batch.closed_reason"] in {"size", "tokens", "age", "drain"}
        assert a["emotion.batch.traced_messages"] == len(span.links)
        assert span.end_time - span.start_time >= 20_000_000  # covers the engine's 20 ms forward pass
        assert span.resource.attributes["service.name"] == "emotion-stream"
        assert span.resource.attributes["service.instance.id"] == "w-7"
        for link in span.links:
            ctx = link.context
            key = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
            assert key not in links, "a message linked twice"
            assert ctx.is_remote
            links[key] = ctx
            assert f"{ctx.trace_id:032x}" != f"{span.context.trace_id:032x}"
    assert set(links) == set(traced)  # every traced message, and only those
    for key, (flags, state) in traced.items():
        ctx = links[key]
        assert int(ctx.trace_flags) == int(flags, 16)
        assert (ctx.trace_state.to_header() if state else "") == (state or "")
    # batch ids and sizes agree with the stage_metrics records of the same batches
    assert sorted(s.attributes["emotion.batch.size"] for s in spans) == sorted(d["size"] for d in batches)


async def test_a_batch_of_untraced_messages_still_makes_a_span_without_links() -> None:
    exporter = InMemorySpanExporter()
    tracer = batch_tracer(TracingSettings(), engine="e", consumer_group="g", worker_id="w", exporter=exporter)
    assert tracer is not None
    p = build(ListSink(), tracer=tracer)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "hello there"))]})
        assert await p.drain(5.0)
    finally:
        await p.stop()
    tracer.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.links == () or list(span.links) == []
    assert span.attributes["emotion.batch.traced_messages"] == 0


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    """A loopback HTTP endpoint that records OTLP/HTTP exports (what an OpenTelemetry Collector receives)."""
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1/traces", received
    finally:
        server.shutdown()
        server.server_close()


async def test_spans_reach_an_otlp_http_endpoint_with_the_configured_headers(collector: Any) -> None:
    endpoint, received = collector
    settings = TracingSettings(otlp_endpoint=endpoint, otlp_headers=SecretStr("x-api-key=s3cret, x-team = ops"))
    tracer = batch_tracer(settings, engine="onnx-int8", consumer_group="g", worker_id="w-1")
    assert tracer is not None
    p = build(ListSink(), tracer=tracer)
    recs, traced = _records()
    await p.start()
    try:
        await p.feed("chat.in", {0: recs})
        assert await p.drain(10.0)
    finally:
        await p.stop()
    tracer.shutdown()
    assert received, "nothing exported"
    spans = []
    for path, headers, body in received:
        assert path == "/v1/traces"
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-api-key"] == "s3cret" and headers["x-team"] == "ops"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert resource["service.name"] == "emotion-stream" and resource["service.instance.id"] == "w-1"
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    linked = {(link.trace_id.hex(), link.span_id.hex()) for s in spans for link in s.links}
    assert linked == set(traced)
    assert {s.name for s in spans} == {"process chat.in"}


def test_parse_otlp_headers() -> None:
    assert parse_otlp_headers("") == {}
    assert parse_otlp_headers("a=1, b = two ,bad,=x, c=") == {"a": "1", "b": "two", "c": ""}


def test_tracing_is_off_by_default_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMOTION_STREAM_TRACING__OTLP_ENDPOINT", raising=False)
    assert load_settings().tracing.otlp_endpoint == ""
    assert batch_tracer(load_settings().tracing, engine="e", consumer_group="g", worker_id="w") is None
    monkeypatch.setenv("EMOTION_STREAM_TRACING__OTLP_ENDPOINT", "http://collector:4318/v1/traces")
    monkeypatch.setenv("EMOTION_STREAM_TRACING__MAX_QUEUE_SPANS", "64")
    tracing = load_settings().tracing
    assert (tracing.otlp_endpoint, tracing.max_queue_spans) == ("http://collector:4318/v1/traces", 64)


_IMPORTS = """
import json, sys
from stream_app.settings import load_settings
from stream_app.tracing import batch_tracer
import stream_app.worker.app, stream_app.worker.run, stream_app.core.pipeline, stream_app.cli
tracer = batch_tracer(load_settings().tracing, engine="e", consumer_group="g", worker_id="w")
print(json.dumps({"on": tracer is not None, "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
if tracer is not None:
    tracer.shutdown()
"""


@pytest.mark.parametrize("endpoint", ["", "http://127.0.0.1:9/v1/traces"])
def test_with_tracing_off_no_opentelemetry_module_is_imported(endpoint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMOTION_STREAM_TRACING__", "OTEL_"))}
    env["EMOTION_STREAM_TRACING__OTLP_ENDPOINT"] = endpoint
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if endpoint:  # the control: on, the SDK and the exporter are loaded (so the check above can see them)
        assert found["on"] and "opentelemetry.sdk.trace" in found["otel"]
        assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in found["otel"]
    else:
        assert found == {"on": False, "otel": []}


def test_a_failing_span_never_reaches_the_pipeline(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter gone mad")

    from stream_app.core.classifier import BatchStats
    from stream_app.tracing import BatchTracer

    tracer = BatchTracer(Broken(), engine="e", consumer_group="g")
    stats = BatchStats(1, 0, 0, 0, 1, "drain", 0.0, 0.0, 0.0, 0.0, 0)
    tracer.on_batch([], stats)
    tracer.on_batch([], stats)
    assert tracer.failures == 2
    assert sum("could not be made" in r.message for r in caplog.records) == 1
