"""``emotion-stream worker`` with a zero-cost engine injected: the host path's ceiling, not a product setting.

Everything is the product's own code (Faust, the core pipeline, the real tokenizer, the aiokafka sink)
except the engine, whose ``predict`` returns uniform probabilities at once. The benchmark starts this file
the way it starts a worker; with ``--real-engine`` it runs the unpatched worker for comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stream_app.inference.base import EngineInfo, FloatArray, labels_from_config, read_model_config
from stream_app.inference.tokenize import EncodedBatch, TextEncoder
from stream_app.metrics import Metrics
from stream_app.settings import Settings


class FreeEngine:
    """Uniform probabilities, no computation: what the host path costs when inference costs nothing."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.info = EngineInfo(
            kind="onnx", runtime="free", precision="fp32", device="cpu", model_name="free", model_version="0"
        )
        self._row = np.full(len(labels), 1.0 / len(labels), dtype=np.float32)

    def predict(self, batch: EncodedBatch) -> FloatArray:
        return np.tile(self._row, (batch.size, 1))

    def close(self) -> None:
        pass


def free_runtime(settings: Settings, metrics: Metrics | None = None) -> object:
    from stream_app.service import Runtime, concurrent_batches, inference_threads, resolve_model_path

    metrics = metrics or Metrics()
    path = resolve_model_path(settings)
    encoder = TextEncoder.from_pretrained(path, max_length=settings.model.max_length_tokens)
    engine = FreeEngine(labels_from_config(read_model_config(path)))
    concurrency = concurrent_batches(settings, "cpu")
    return Runtime(
        settings,
        metrics,
        engine,
        encoder,
        None,
        concurrent_batches=concurrency,  # type: ignore[arg-type]
        inference_threads=inference_threads(settings, concurrency),
    )


if __name__ == "__main__":
    if "--real-engine" not in sys.argv:
        import stream_app.worker.run as run

        run.build_runtime = free_runtime  # type: ignore[assignment]
    from stream_app.cli import main

    main(["worker"])
