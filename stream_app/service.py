"""Load the model from settings: model path, engine (selection, parity gate, warm-up) and tokenizer.

No broker here: the worker (``stream_app.worker``) calls :func:`build_runtime` in a thread while Faust joins
the group, and builds the pipeline around what it returns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from stream_app.errors import ModelError
from stream_app.inference.base import Engine, available_cores
from stream_app.inference.parity import default_parity_texts
from stream_app.inference.select import SelectionReport, resolve_device
from stream_app.inference.startup import EngineStart, start_engine
from stream_app.inference.tokenize import TextEncoder
from stream_app.metrics import Metrics
from stream_app.settings import Settings

__all__ = [
    "Runtime",
    "build_runtime",
    "concurrent_batches",
    "inference_threads",
    "parity_texts",
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


@dataclass
class Runtime:
    """The loaded model, ready to be wired to a broker."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    encoder: TextEncoder
    selection: SelectionReport
    concurrent_batches: int = 1
    inference_threads: int = 1
    load_s: float = 0.0
    warm_file_phrases: list[str] = field(default_factory=list)
    engine_start: EngineStart | None = None


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
    for phase, seconds in started.phases.items():  # import (of the engine's runtime), engine_load, warmup
        metrics.cold_start_seconds.labels("engine_import" if phase == "import" else phase).set(seconds)
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
    phrases: list[str] = []
    if settings.cache.warm_file is not None:
        text = Path(settings.cache.warm_file).read_text(encoding="utf-8")
        phrases = [line.strip() for line in text.splitlines() if line.strip()]
    return Runtime(
        settings,
        metrics,
        engine,
        encoder,
        report,
        concurrent_batches=concurrency,
        inference_threads=threads,
        load_s=started.seconds,
        warm_file_phrases=phrases,
        engine_start=started,
    )
