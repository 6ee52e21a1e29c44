"""``emotion-stream worker`` whose engine kills the process in native code on a marker text (tests only).

Everything is the product's own code except the engine, which wraps the real one: a batch holding the
tokens of ``EMOTION_STREAM_TEST_POISON_MARKER`` makes it call ``os.abort()`` (SIGABRT, as a crash inside
ONNX Runtime or the tokenizer would end the process: no exception, no shutdown hook, no commit). With
``EMOTION_STREAM_TEST_POISON_STAGE=tokenize`` the tokenizer aborts instead, on a text holding the marker.
``EMOTION_STREAM_TEST_SLOW_LOAD_S`` makes the model take that much longer to load.
Injected the way ``benchmarks/host/free_engine_worker.py`` injects its engine: by replacing
``stream_app.worker.run.build_runtime`` before the worker starts.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stream_app.inference.base import Engine, EngineInfo, FloatArray
from stream_app.inference.tokenize import Encoded, EncodedBatch, TextEncoder
from stream_app.metrics import Metrics
from stream_app.settings import Settings

MARKER = os.environ.get("EMOTION_STREAM_TEST_POISON_MARKER", "")
STAGE = os.environ.get("EMOTION_STREAM_TEST_POISON_STAGE", "infer")
SLOW_LOAD_S = float(os.environ.get("EMOTION_STREAM_TEST_SLOW_LOAD_S", "0"))


class PoisonEngine:
    """The real engine, except that a batch with the marker's tokens in a row aborts the process."""

    def __init__(self, inner: Engine, marker_ids: Sequence[int]) -> None:
        self.inner = inner
        self.marker = np.asarray(marker_ids, dtype=np.int64)

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    @property
    def labels(self) -> tuple[str, ...]:
        return self.inner.labels

    def _poisoned(self, batch: EncodedBatch) -> bool:
        n = len(self.marker)
        if n == 0 or batch.seq_len < n:
            return False
        windows = np.lib.stride_tricks.sliding_window_view(batch.input_ids, n, axis=1)
        return bool((windows == self.marker).all(axis=2).any())

    def predict(self, batch: EncodedBatch) -> FloatArray:
        if self._poisoned(batch):
            sys.stderr.write(f"poison_worker: marker in a batch of {batch.size}: abort\n")
            sys.stderr.flush()
            os.abort()
        return self.inner.predict(batch)

    def close(self) -> None:
        self.inner.close()


class PoisonEncoder:
    """The real tokenizer, except that a text holding the marker aborts the process."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        if any(MARKER in t for t in texts):
            sys.stderr.write(f"poison_worker: marker in a tokenizer call of {len(texts)}: abort\n")
            sys.stderr.flush()
            os.abort()
        return self.inner.encode(texts)


def poisoned_runtime(settings: Settings, metrics: Metrics | None = None) -> object:
    from stream_app.service import build_runtime

    if SLOW_LOAD_S:  # a model that takes this long to load (a large checkpoint, a slow device or download)
        time.sleep(SLOW_LOAD_S)
    runtime = build_runtime(settings, metrics)
    # the marker's own word pieces, without [CLS] and [SEP]
    ids = runtime.encoder.encode([MARKER])[0].input_ids[1:-1]
    if not MARKER:
        return runtime
    if STAGE == "tokenize":
        runtime.encoder = PoisonEncoder(runtime.encoder)  # type: ignore[assignment]
    else:
        runtime.engine = PoisonEngine(runtime.engine, ids)
    return runtime


if __name__ == "__main__":
    if not MARKER and not SLOW_LOAD_S:
        raise SystemExit("set EMOTION_STREAM_TEST_POISON_MARKER (or EMOTION_STREAM_TEST_SLOW_LOAD_S)")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file per crash
    import stream_app.worker.run as run

    run.build_runtime = poisoned_runtime  # type: ignore[assignment]
    from stream_app.cli import main

    main(["worker"])
