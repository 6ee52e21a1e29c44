"""A stand-in for a worker's metrics port: the worker's own collectors, kept moving, on a loopback port.

The collectors are the real ones (:class:`stream_app.metrics.Metrics`), so their names, types and label names
are the worker's. The metrics named in the wave's contract (lag, readiness, cold-start phases...) are added
here only while ``Metrics`` does not define them yet; once the rewrite defines them this list adds nothing
and can go. A background thread keeps counters rising and histograms filling, so ``rate()`` and
``histogram_quantile()`` have something to compute; every child of every labelled collector exists.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from stream_app.metrics import Metrics

__all__ = ["CONTRACT_METRICS", "FakeWorker", "fake_worker"]

# name -> (type, help, label names): CONTRACTS.md's new metrics
CONTRACT_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "emotion_consumer_lag_messages": ("gauge", "Records not yet processed.", ("partition",)),
    "emotion_consumer_lag_seconds": ("gauge", "Age of the oldest unprocessed record.", ("partition",)),
    "emotion_offset_resets_total": ("counter", "Offset resets.", ("partition",)),
    "emotion_partitions_changes_total": ("counter", "Input partition count changed while running.", ()),
    "emotion_l2_rebuilds_total": ("counter", "L2 state discarded and rebuilt.", ("reason",)),
    "emotion_ready": ("gauge", "1 when ready.", ()),
    "emotion_conversation_alerts_total": ("counter", "Conversation alerts.", ("rule",)),
    "emotion_conversations_active": ("gauge", "Active conversations.", ()),
}
# emotion_cold_start_seconds{phase} replaces the unlabelled gauge of the same name in the rewrite
COLD_START_PHASES = ("import", "engine_load", "warmup", "kafka_join", "first_event")

_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "stage": ("decode", "cache", "queue_wait", "tokenize", "infer", "postprocess", "produce"),
    "reason": ("schema", "parity_failed"),
    "level": ("l1", "l2"),
    "result": ("hit", "miss"),
    "engine": ("onnx-int8",),
    "device": ("cpu",),
    "model_version": ("test",),
    "phase": COLD_START_PHASES,
    "rule": ("escalation",),
}


def _collectors(metrics: Metrics) -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def _names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


class FakeWorker:
    """The collectors of one worker owning ``partitions``, moving on each :meth:`tick`."""

    def __init__(self, partitions: tuple[int, ...]) -> None:
        self.metrics = Metrics()
        self.registry = self.metrics.registry
        self.partitions = tuple(str(p) for p in partitions)
        self._extra: list[MetricWrapperBase] = []
        # a collector's family name drops the `_total` suffix of a counter
        defined = _names(self.registry)
        for name, (kind, help_text, labels) in CONTRACT_METRICS.items():
            if name.removesuffix("_total") in defined:
                continue
            cls = Counter if kind == "counter" else Gauge
            self._extra.append(cls(name, help_text, labels, registry=self.registry))
        self._ticks = 0

    def _children(self, collector: MetricWrapperBase) -> Iterator[Any]:
        names: tuple[str, ...] = collector._labelnames
        if not names:
            yield collector
            return
        pools = [self.partitions if n == "partition" else _LABEL_VALUES[n] for n in names]
        for values in itertools.product(*pools):
            yield collector.labels(*values)

    def tick(self) -> None:
        """One step of activity: counters rise, histograms observe, gauges move."""
        self._ticks += 1
        k = self._ticks
        for collector in [*_collectors(self.metrics), *self._extra]:
            kind = collector._type
            for child in self._children(collector):
                if kind == "counter":
                    child.inc(1 + k % 3)
                elif kind == "histogram":
                    child.observe(0.002 * (1 + k % 7))
                elif kind == "gauge":
                    child.set(1 + k % 5)
        if hasattr(self.metrics, "engine_info"):
            self.metrics.engine_info.labels("onnx-int8", "cpu", "test").set(1)


@contextmanager
def fake_worker(partitions: tuple[int, ...], tick_s: float = 0.1) -> Iterator[int]:
    """Serve a :class:`FakeWorker` on a free loopback port (yielded) until the block ends."""
    worker = FakeWorker(partitions)
    worker.tick()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=worker.registry)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(tick_s):
            worker.tick()

    ticker = threading.Thread(target=run, name="fake-worker-ticks", daemon=True)
    ticker.start()
    try:
        yield int(server.server_port)
    finally:
        stop.set()
        ticker.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
