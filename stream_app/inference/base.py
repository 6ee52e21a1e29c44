"""The engine interface and what every engine shares.

An :class:`Engine` turns one padded :class:`~stream_app.inference.tokenize.EncodedBatch` into a
``(rows, labels)`` float32 array of softmax probabilities, nothing more: batching, caching and events live
elsewhere. Engines raise :class:`~stream_app.errors.DeviceOutOfMemoryError` when the accelerator runs out
of memory (:func:`predict_split` then halves the batch) and :class:`~stream_app.errors.EngineError` for
any other failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from stream_app.errors import DeviceOutOfMemoryError, ModelError
from stream_app.inference.tokenize import EncodedBatch

__all__ = [
    "Engine",
    "EngineInfo",
    "EngineKind",
    "FloatArray",
    "Precision",
    "available_cores",
    "engine_name",
    "estimate_bytes_per_token",
    "labels_from_config",
    "memory_token_budget",
    "model_identity",
    "predict_split",
    "read_model_config",
    "resolve_num_threads",
    "softmax",
]

log = logging.getLogger(__name__)

EngineKind = Literal["torch", "onnx"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
FloatArray = npt.NDArray[np.float32]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
_SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What produced a prediction; goes into events, metrics and the selection report."""

    kind: EngineKind
    runtime: str
    precision: Precision
    device: str
    model_name: str
    model_version: str

    @property
    def name(self) -> str:
        """Short engine label: ``torch``, ``torch-fp16``, ``onnx``, ``onnx-int8``..."""
        return engine_name(self.kind, self.precision)


def engine_name(kind: EngineKind, precision: Precision) -> str:
    """``kind`` alone for fp32, else ``kind-precision`` (the names ``ModelSettings.engine`` uses)."""
    return kind if precision == "fp32" else f"{kind}-{precision}"


@runtime_checkable
class Engine(Protocol):
    """A loaded model that scores padded batches. ``predict`` is called from one thread at a time."""

    @property
    def info(self) -> EngineInfo:
        """What this engine is (kind, runtime, precision, device, model)."""
        ...

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in output column order (the checkpoint's ``id2label``)."""
        ...

    def predict(self, batch: EncodedBatch) -> FloatArray:
        """Probabilities, float32, shape ``(batch.size, len(labels))``; each row sums to 1."""
        ...

    def close(self) -> None:
        """Release the model (device memory, sessions). The engine is unusable afterwards."""
        ...


def softmax(logits: npt.NDArray[Any]) -> FloatArray:
    """Row-wise softmax in float32 (fp16 logits are widened first so rows sum to 1 within 1e-6)."""
    x: FloatArray = np.array(logits, dtype=np.float32)  # a copy: the in-place steps below must not leak
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity on Linux, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_num_threads(num_threads: int) -> int:
    """``0`` means one thread per core this process may run on."""
    return num_threads if num_threads > 0 else available_cores()


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict.

    Raises:
        ModelError: the folder or its config is missing or not JSON.
    """
    config_path = Path(path) / "config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is not a model folder (no config.json)") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{config_path} is not a JSON object")
    return data


def labels_from_config(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Label names from ``id2label``, in id order.

    Raises:
        ModelError: ids are not exactly ``0..n-1``.
    """
    raw = config.get("id2label")
    if not isinstance(raw, Mapping) or not raw:
        raise ModelError("model config has no id2label; it is not a sequence-classification checkpoint")
    try:
        by_id = {int(key): str(value) for key, value in raw.items()}
    except ValueError as exc:
        raise ModelError(f"id2label has a non-integer id: {exc}") from exc
    if sorted(by_id) != list(range(len(by_id))):
        raise ModelError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return tuple(by_id[i] for i in range(len(by_id)))


def model_identity(path: str | Path) -> tuple[str, str]:
    """``(name, version)`` of a model folder, used in cache keys, events and the ONNX cache path.

    ``model_card.json`` with ``name``/``version`` wins when present. Otherwise the name is the folder's
    name and the version the first 12 hex digits of a SHA-256 over ``config.json`` and, per weights file,
    its name, size and its first and last MiB. Sampling instead of hashing whole files keeps this fast for
    large checkpoints while still changing after any retraining (every tensor moves, including the ones
    stored at both ends of the file); it does not depend on mtimes, so a copied folder keeps its version.

    Raises:
        ModelError: not a model folder.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)")
    card: dict[str, Any] = {}
    card_path = folder / "model_card.json"
    if card_path.is_file():
        try:
            loaded = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {card_path}: {exc}") from exc
        if isinstance(loaded, dict):
            card = loaded
    name = str(card.get("name") or folder.resolve().name)
    if card.get("version"):
        return name, str(card["version"])

    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    weights = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name in _WEIGHT_FILES or p.suffix == ".safetensors")
    )
    if not weights:
        raise ModelError(f"{path} has no weights file ({', '.join(_WEIGHT_FILES)})")
    for weight in weights:
        size = weight.stat().st_size
        digest.update(f"\0{weight.name}\0{size}\0".encode())
        with weight.open("rb") as fh:
            digest.update(fh.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                fh.seek(size - _SAMPLE_BYTES)
                digest.update(fh.read(_SAMPLE_BYTES))
            else:
                digest.update(fh.read())
    return name, digest.hexdigest()[:12]


def predict_split(engine: Engine, batch: EncodedBatch, on_oom: Callable[[], object] | None = None) -> FloatArray:
    """``engine.predict(batch)``, halving the batch on device out-of-memory until it fits.

    Rows come back in input order and none is lost. ``on_oom`` is called once per out-of-memory event
    (to count it, or to shrink the batcher's token budget). A single row that still does not fit
    re-raises :class:`DeviceOutOfMemoryError`.
    """
    try:
        return engine.predict(batch)
    except DeviceOutOfMemoryError:
        if on_oom is not None:
            on_oom()
        if batch.size <= 1:
            raise
        log.warning("device out of memory on a batch of %d rows x %d tokens: splitting", batch.size, batch.seq_len)
    middle = batch.size // 2
    first = predict_split(engine, batch.take(0, middle), on_oom)
    second = predict_split(engine, batch.take(middle, batch.size), on_oom)
    return np.concatenate([first, second], axis=0)


def estimate_bytes_per_token(config: Mapping[str, Any], bytes_per_value: int, max_length: int = 128) -> int:
    """Peak activation bytes one padded token costs in an encoder forward pass (inference, no grad).

    The widest live tensors per token are the feed-forward intermediate (plus its activation output) and
    a few hidden-size buffers; attention scores add ``heads x seq_len`` values per token when the kernel
    materialises them (eager attention; SDPA's fused kernels do not, so this over-estimates there). A
    factor of 2 covers allocator fragmentation and transient copies.
    """
    hidden = int(config.get("hidden_size", 768))
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    heads = int(config.get("num_attention_heads", 12))
    values = 2 * intermediate + 6 * hidden + heads * max_length
    return 2 * values * bytes_per_value


def memory_token_budget(engine: Engine, *, headroom: float = 0.5, ceiling: int = 1 << 20) -> int | None:
    """Largest padded-token count one batch may have on the engine's CUDA device; ``None`` on a CPU (or
    without torch).

    Free memory (``torch.cuda.mem_get_info``, which sees every allocator on the device, ONNX Runtime's
    arena too) times ``headroom``, divided by the engine's ``bytes_per_token`` (an estimate, raised by
    :func:`~stream_app.inference.select.warm_up` to what was measured).

    Args:
        engine: an engine; those without ``bytes_per_token`` get a conservative default.
        headroom: fraction of free memory one batch may use; the rest stays for the allocator's cache,
            other processes and the next batch.
        ceiling: upper bound, so a huge card does not suggest batches slower than the latency target.
    """
    device = engine.info.device
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError:  # an ONNX-only install: no allocator-wide view of free memory, so no cap
        log.info("no torch to read free CUDA memory; the token budget is not capped by memory")
        return None

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    per_token = int(getattr(engine, "bytes_per_token", 0)) or 64 * 1024
    return max(1, min(ceiling, int(free * headroom) // per_token))
