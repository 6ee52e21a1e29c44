"""The ONNX Runtime engine: fp32 or INT8 on a CPU, fp16 (or fp32) on CUDA with IO binding.

ONNX files are looked up in ``<model>/onnx/`` and otherwise built once into
``<cache_dir>/onnx/<model version>/``. The INT8 file's name carries its recipe
(``model.int8.<INT8_SCHEME>.onnx``): a file made by another recipe, such as the batch-dependent
``model.int8.onnx`` of earlier versions, is never picked up for this one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_app.errors import DeviceOutOfMemoryError, EngineError
from stream_app.inference._optional import require
from stream_app.inference.base import (
    EngineInfo,
    FloatArray,
    estimate_bytes_per_token,
    labels_from_config,
    model_identity,
    read_model_config,
    resolve_num_threads,
    softmax,
)
from stream_app.inference.onnx_export import INT8_SCHEME, convert_fp16, export_fp32, quantize_int8
from stream_app.inference.tokenize import EncodedBatch

__all__ = ["ONNX_FILES", "OnnxEngine", "OnnxPrecision", "onnx_model_file"]

log = logging.getLogger(__name__)

OnnxPrecision = Literal["fp32", "int8", "fp16"]
ONNX_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "int8": f"model.int8.{INT8_SCHEME}.onnx",
    "fp16": "model.fp16.onnx",
}
"""File name of each precision, in ``<model>/onnx/`` and in the cache."""
# Substrings of ONNX Runtime's messages when an allocation fails (BFC arena, cudaMalloc, CPU allocator).
_OOM_MARKERS = ("out of memory", "failed to allocate", "bfcarena", "cudaerrormemoryallocation")


def onnx_model_file(
    model_path: str | Path, precision: OnnxPrecision, cache_dir: Path | None, model_version: str | None = None
) -> Path:
    """The ONNX file for ``precision``, exporting (and quantising/converting) it on first use.

    A file shipped in ``<model>/onnx/`` wins; otherwise it is built once into
    ``<cache_dir>/onnx/<model_version>/`` and reused by every later start with the same model version.

    Raises:
        EngineError: it must be built and ``cache_dir`` is None, or the build failed.
    """
    shipped = Path(model_path) / "onnx" / ONNX_FILES[precision]
    if shipped.is_file():
        return shipped
    if cache_dir is None:
        raise EngineError(f"{shipped} does not exist and no cache_dir was given to export it into")
    version = model_version or model_identity(model_path)[1]
    folder = Path(cache_dir) / "onnx" / version
    target = folder / ONNX_FILES[precision]
    if target.is_file():
        return target
    fp32 = Path(model_path) / "onnx" / ONNX_FILES["fp32"]
    if not fp32.is_file():
        fp32 = folder / ONNX_FILES["fp32"]
        if not fp32.is_file():
            log.info("exporting %s to ONNX in %s", model_path, folder)
            export_fp32(model_path, fp32)
    if precision == "int8":
        quantize_int8(fp32, target)
    elif precision == "fp16":
        convert_fp16(fp32, target)
    return target


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


class OnnxEngine:
    """An ONNX Runtime ``InferenceSession`` over the exported classifier.

    CPU: fp32 or INT8 (:data:`~stream_app.inference.onnx_export.INT8_SCHEME`: int8 weights per channel, int8
    activations quantised per row, so scores do not depend on the batch; about 1.8x fp32 on one core), graph
    optimisation ``ORT_ENABLE_ALL`` (fuses attention, layer norm and GELU), ``num_threads`` intra-op
    threads and one inter-op thread (a single sequential graph). CUDA: the ``CUDAExecutionProvider`` of
    the optional ``onnxruntime-gpu`` package (extra ``gpu``), fp16 or fp32, inputs copied once and logits
    left on the device until the run ends (IO binding).
    """

    def __init__(
        self,
        path: str | Path,
        precision: OnnxPrecision = "fp32",
        device: str = "cpu",
        num_threads: int = 0,
        *,
        cache_dir: Path | None = None,
        allow_spinning: bool = True,
        model_file: Path | None = None,
    ) -> None:
        """Find or build the ONNX file and open a session.

        Args:
            path: model folder (``config.json`` with ``id2label``; optional ``onnx/`` with prebuilt files).
            precision: ``fp32``, ``int8`` (CPU only) or ``fp16`` (CUDA only).
            device: ``cpu``, ``cuda`` or ``cuda:N``.
            num_threads: intra-op threads on a CPU; 0 = one per core.
            cache_dir: where to export to when the model folder ships no ONNX file
                (``settings.data.cache_dir``); the engine never reads settings itself.
            allow_spinning: let idle intra-op threads spin for a moment before sleeping. Spinning shaves
                latency off back-to-back batches but burns CPU that tokenisation on the same cores could
                use between batches.
            model_file: run this ONNX file instead of looking one up (benchmarks comparing recipes);
                ``precision`` must still describe it.

        Raises:
            EngineError: unsupported precision/device pair, missing ``onnxruntime-gpu``, a failed export,
                or a session that cannot be created.
            ModelError: ``path`` is not a usable checkpoint.
        """
        ort: Any = require("onnxruntime", "the ONNX engine")

        device_type, _, index_text = device.partition(":")
        if device_type not in ("cpu", "cuda"):
            raise EngineError(f"unsupported device {device!r} (use cpu or cuda)")
        if device_type == "cpu" and precision == "fp16":
            raise EngineError("ONNX fp16 needs CUDA; the CPU provider lacks fast fp16 kernels")
        if device_type == "cuda" and precision == "int8":
            raise EngineError("ONNX INT8 runs on the CPU provider only")
        providers: list[Any]
        if device_type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError(
                    "ONNX on CUDA needs onnxruntime-gpu (pip install 'emotion-stream[gpu]'); "
                    f"available providers: {ort.get_available_providers()}"
                )
            device_id = int(index_text or 0)
            providers = [
                (
                    "CUDAExecutionProvider",
                    {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"},
                ),
                "CPUExecutionProvider",
            ]
            device = f"cuda:{device_id}"
        else:
            device_id = 0
            providers = ["CPUExecutionProvider"]
            device = "cpu"

        config = read_model_config(path)
        self.labels: tuple[str, ...] = labels_from_config(config)
        name, version = model_identity(path)
        self.model_file = (
            Path(model_file) if model_file is not None else onnx_model_file(path, precision, cache_dir, version)
        )

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = resolve_num_threads(num_threads) if device_type == "cpu" else 1
        options.inter_op_num_threads = 1
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session: Any = ort.InferenceSession(str(self.model_file), options, providers=providers)
        # Broad on purpose: ORT's pybind layer raises several unrelated classes; all mean "no session".
        except Exception as exc:
            if _is_oom(exc):
                raise DeviceOutOfMemoryError(f"ONNX session does not fit on {device}: {exc}") from exc
            raise EngineError(f"cannot open ONNX session for {self.model_file}: {exc}") from exc
        if device_type == "cuda" and "CUDAExecutionProvider" not in self._session.get_providers():
            raise EngineError("ONNX Runtime fell back to the CPU provider; CUDA is not usable here")

        self._input_names = tuple(i.name for i in self._session.get_inputs())
        self._output_name = self._session.get_outputs()[0].name
        self._cuda = device_type == "cuda"
        self._device_id = device_id
        self._max_length = int(config.get("max_position_embeddings", 512))
        self.bytes_per_token = estimate_bytes_per_token(config, 2 if precision == "fp16" else 4)
        self.info = EngineInfo(
            kind="onnx",
            runtime=f"onnxruntime-{ort.__version__}",
            precision=precision,
            device=device,
            model_name=name,
            model_version=version,
        )

    def _feeds(self, batch: EncodedBatch) -> dict[str, np.ndarray[Any, Any]]:
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for input_name in self._input_names:
            if input_name == "input_ids":
                feeds[input_name] = batch.input_ids
            elif input_name == "attention_mask":
                feeds[input_name] = batch.attention_mask
            elif input_name == "token_type_ids":
                types = batch.token_type_ids
                feeds[input_name] = np.zeros_like(batch.input_ids) if types is None else types
            else:
                raise EngineError(f"the ONNX model wants an input this engine cannot feed: {input_name!r}")
        return feeds

    def predict(self, batch: EncodedBatch) -> FloatArray:
        """Softmax probabilities for ``batch``; see :class:`~stream_app.inference.base.Engine`."""
        if batch.size == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if batch.seq_len > self._max_length:
            raise EngineError(f"batch of {batch.seq_len} tokens exceeds the model's {self._max_length}")
        feeds = self._feeds(batch)
        try:
            if self._cuda:
                binding = self._session.io_binding()
                for input_name, array in feeds.items():
                    binding.bind_cpu_input(input_name, np.ascontiguousarray(array))
                binding.bind_output(self._output_name, "cuda", self._device_id)
                self._session.run_with_iobinding(binding)
                logits = binding.copy_outputs_to_cpu()[0]
            else:
                logits = self._session.run([self._output_name], feeds)[0]
        # Broad on purpose: ORT's run errors share no useful base class; each is translated, none swallowed.
        except Exception as exc:
            if _is_oom(exc):
                raise DeviceOutOfMemoryError(
                    f"ONNX Runtime out of memory on {batch.size} rows x {batch.seq_len} tokens"
                ) from exc
            raise EngineError(f"ONNX Runtime run failed: {exc}") from exc
        return softmax(logits)

    def close(self) -> None:
        """Drop the session (frees its arena)."""
        self._session = None
