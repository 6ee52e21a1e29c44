"""Build the worker's parts from settings: model path, engine, encoder, caches and the pipeline.

No broker here: ``cli.py`` and the tests call :func:`build_runtime`, then hand
:meth:`Runtime.pipeline_factory` to :func:`stream_app.app.create_app`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from stream_app.cache.admission import Admission, AlwaysAdmit, SecondSightingAdmission
from stream_app.cache.lru import TtlLru
from stream_app.errors import ModelError
from stream_app.inference.base import Engine, available_cores
from stream_app.inference.parity import default_parity_texts
from stream_app.inference.select import SelectionReport, resolve_device
from stream_app.inference.startup import EngineStart, start_engine
from stream_app.inference.tokenize import TextEncoder
from stream_app.metrics import Metrics
from stream_app.pipeline import L1Entry, Pipeline, PipelineConfig, Sink
from stream_app.settings import Settings

__all__ = [
    "Runtime",
    "build_runtime",
    "concurrent_batches",
    "inference_threads",
    "parity_texts",
    "pipeline_config",
    "resolve_model_path",
]

_log = logging.getLogger(__name__)


def parity_texts() -> list[str]:
    """The fixed sample used for engine parity checks and warm-up (chat-like, all seven emotions)."""
    return default_parity_texts()


def resolve_model_path(settings: Settings) -> str:
    """The configured checkpoint, or the model built by ``emotion-stream model build``."""
    if settings.model.path:
        return settings.model.path
    from stream_app.model.train import resolve_default_model

    built = resolve_default_model(settings.data.goemotions_dir, settings.data.cache_dir)
    if built is None:
        raise ModelError(
            "no model configured and none built yet: run `emotion-stream model build` "
            "or set EMOTION_STREAM_MODEL__PATH to a Hugging Face checkpoint (folder or hub id)"
        )
    return str(built)


def concurrent_batches(settings: Settings, device: str) -> int:
    """``batching.concurrent_batches``, with 0 resolved for ``device``: 2 on a CPU, 1 on CUDA."""
    return settings.batching.concurrent_batches or (1 if device.startswith("cuda") else 2)


def inference_threads(settings: Settings, concurrency: int) -> int:
    """``model.num_threads``, with 0 resolved: the cores but one, shared by the concurrent batches."""
    return settings.model.num_threads or max(1, (available_cores() - 1) // concurrency)


def pipeline_config(settings: Settings, concurrency: int | None = None) -> PipelineConfig:
    """The pipeline's plain values; ``concurrency`` is the resolved ``concurrent_batches`` (default 1)."""
    b, m, c = settings.batching, settings.model, settings.cache
    return PipelineConfig(
        worker_id=settings.worker.worker_id,
        max_batch_size=b.max_batch_size,
        max_batch_tokens=b.max_batch_tokens,
        max_wait_s=b.max_wait_ms / 1000.0,
        queue_capacity=b.queue_capacity,
        group_by_length=b.group_by_length,
        adaptive=b.adaptive,
        target_batch_s=b.target_batch_p99_ms / 1000.0,
        min_batch_tokens=b.min_batch_tokens,
        max_batch_tokens_ceiling=b.max_batch_tokens_ceiling,
        overlong_reject=m.overlong == "reject",
        max_message_bytes=m.max_message_bytes,
        max_text_chars=m.max_text_chars,
        l2_ttl_s=c.l2_ttl_s,
        l2_enabled=c.l2_enabled,
        concurrent_batches=concurrency or b.concurrent_batches or 1,
        overlap_full_batches_only=b.overlap_full_batches_only,
    )


@dataclass
class Runtime:
    """The loaded model and caches, ready to be wired to a broker."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    encoder: TextEncoder
    selection: SelectionReport
    l1: TtlLru[bytes, L1Entry] | None
    admission: Admission | None
    warm_entries: list[tuple[str, L1Entry]] = field(default_factory=list)
    concurrent_batches: int = 1
    engine_start: EngineStart | None = None

    def pipeline_factory(self, sink: Sink) -> Pipeline:
        pipeline = Pipeline(
            engine=self.engine,
            encoder=self.encoder,
            sink=sink,
            config=pipeline_config(self.settings, self.concurrent_batches),
            metrics=self.metrics,
            l1=self.l1,
            admission=self.admission,
        )
        if self.warm_file_phrases:
            pipeline.warm(self.warm_file_phrases)
        return pipeline

    @property
    def warm_file_phrases(self) -> list[str]:
        path = self.settings.cache.warm_file
        if path is None:
            return []
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_runtime(settings: Settings, metrics: Metrics | None = None) -> Runtime:
    """Start the engine (:func:`~stream_app.inference.startup.start_engine`: cached selection, parity
    gate, warm-up), and build the caches."""
    metrics = metrics or Metrics()
    model_path = resolve_model_path(settings)
    if Path(model_path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    m = settings.model

    def on_fallback(from_engine: str, to_engine: str, reason: str) -> None:
        _log.warning("engine fallback %s -> %s: %s", from_engine, to_engine, reason)
        # reasons start with a fixed code (load_failed, parity_failed, nondeterministic, unsupported, ...)
        metrics.engine_fallbacks_total.labels(reason.split(":", 1)[0]).inc()

    concurrency = concurrent_batches(settings, resolve_device(m.device))
    threads = inference_threads(settings, concurrency)
    started = start_engine(
        model_path,
        engine=m.engine,
        device=m.device,
        gpu_dtype=m.gpu_dtype,
        num_threads=threads,
        cache_dir=settings.data.cache_dir,
        parity_texts=parity_texts()[: m.parity_sample_size],
        min_top1_agreement=m.parity_min_top1_agreement,
        max_prob_diff=m.parity_max_prob_diff,
        max_length=m.max_length_tokens,
        on_fallback=on_fallback,
        cpu_spin_wait=m.cpu_spin_wait,
    )
    engine, encoder, report = started.engine, started.encoder, started.report
    _log.info("inference: %d concurrent batch(es), %d intra-op thread(s) each on a CPU", concurrency, threads)
    # One figure until the gauge gets its ``phase`` label; the phases are in Runtime.engine_start.
    metrics.cold_start_seconds.set(started.seconds)
    info = engine.info
    metrics.engine_info.labels(f"{info.kind}-{info.precision}", info.device, info.model_version).set(1)
    _log.info(
        "model %s (%s) on %s-%s/%s ready in %.2fs (%s; %s)",
        info.model_name,
        info.model_version,
        info.kind,
        info.precision,
        info.device,
        started.seconds,
        "cached selection" if started.cached else "full selection",
        ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in started.phases.items()),
    )
    c = settings.cache
    l1: TtlLru[bytes, L1Entry] | None = TtlLru(max_entries=c.l1_max_entries, ttl_s=c.l1_ttl_s) if c.l1_enabled else None
    admission: Admission | None
    if c.admission == "second_sighting":
        admission = SecondSightingAdmission(capacity=max(1024, c.l2_max_entries_per_partition))
    else:
        admission = AlwaysAdmit()
    return Runtime(
        settings,
        metrics,
        engine,
        encoder,
        report,
        l1,
        admission,
        concurrent_batches=concurrency,
        engine_start=started,
    )
