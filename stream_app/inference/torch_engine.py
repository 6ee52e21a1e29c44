"""The PyTorch engine: the reference every other engine is checked against, and the fallback."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_app.errors import DeviceOutOfMemoryError, EngineError, ModelError
from stream_app.inference._optional import require
from stream_app.inference.base import (
    EngineInfo,
    FloatArray,
    Precision,
    estimate_bytes_per_token,
    labels_from_config,
    model_identity,
    read_model_config,
    resolve_num_threads,
)
from stream_app.inference.tokenize import EncodedBatch

__all__ = ["TorchDtype", "TorchEngine"]

log = logging.getLogger(__name__)

TorchDtype = Literal["float32", "float16", "bfloat16"]
_PRECISION: dict[str, Precision] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class TorchEngine:
    """``AutoModelForSequenceClassification`` in eval mode under ``torch.inference_mode``.

    On CUDA it runs in ``dtype`` (fp16 or bf16 halve memory and use tensor cores) with SDPA attention;
    on a CPU always in float32, where half precision is slower and less exact.

    On CUDA, SDPA may use the flash, memory-efficient or math kernels but not cuDNN's: PyTorch prefers
    cuDNN attention for half precision on Hopper, and it builds an execution plan for every new
    ``(rows, seq_len)`` shape. Stream batches rarely repeat a shape, so on an H100 that plan building
    (tens to 150 ms) dominated: fp16 ran at a quarter of fp32's speed with the GPU 5-10% busy
    (``benchmarks/gpu.py``).
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: TorchDtype = "float32",
        num_threads: int = 0,
        *,
        cudnn_attention: bool = False,
    ) -> None:
        """Load the checkpoint.

        Args:
            path: model folder (``config.json`` with ``id2label``, weights, tokenizer).
            device: ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: precision on CUDA; ignored (float32) on a CPU.
            num_threads: CPU intra-op threads (``torch.set_num_threads``, process-wide); 0 = one per core.
            cudnn_attention: on CUDA, let SDPA pick cuDNN attention too (PyTorch's default); off by
                default, see the class docstring. Kept for comparison runs.

        Raises:
            ModelError: the folder is not a usable checkpoint.
            EngineError: the device is not available, or torch/transformers are not installed
                (:class:`~stream_app.inference._optional.MissingExtraError`, naming the ``torch`` extra).
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch: Any = require("torch", "the PyTorch engine")
        transformers: Any = require("transformers", "the PyTorch engine")
        AutoModelForSequenceClassification = transformers.AutoModelForSequenceClassification

        self._torch = torch
        config = read_model_config(path)
        self.labels: tuple[str, ...] = labels_from_config(config)
        name, version = model_identity(path)

        torch_device = torch.device(device)
        if torch_device.type == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("CUDA requested but torch.cuda.is_available() is False")
            if torch_device.index is None:
                torch_device = torch.device("cuda", torch.cuda.current_device())
        elif torch_device.type == "cpu":
            if dtype != "float32":
                log.info("the CPU engine runs float32; ignoring dtype=%s", dtype)
            dtype = "float32"
            torch.set_num_threads(resolve_num_threads(num_threads))
        else:
            raise EngineError(f"unsupported device {device!r} (use cpu or cuda)")
        self._device = torch_device
        self._dtype = getattr(torch, dtype)
        self._attention: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if torch_device.type == "cuda" and not cudnn_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            self._attention = lambda: sdpa_kernel(backends)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=self._dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a sequence-classification model from {path}: {exc}") from exc
        if model.config.num_labels != len(self.labels):
            raise ModelError(f"{path}: num_labels {model.config.num_labels} != {len(self.labels)} labels")
        try:
            self._model: Any = model.to(torch_device).eval()
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceOutOfMemoryError(f"model does not fit on {torch_device}: {exc}") from exc
        self._uses_token_types = "token_type_ids" in inspect.signature(self._model.forward).parameters
        self._max_length = int(config.get("max_position_embeddings", 512))
        self.bytes_per_token = estimate_bytes_per_token(config, _BYTES[dtype])
        self.info = EngineInfo(
            kind="torch",
            runtime=f"torch-{torch.__version__.split('+')[0]}",
            precision=_PRECISION[dtype],
            device=str(torch_device),
            model_name=name,
            model_version=version,
        )

    def predict(self, batch: EncodedBatch) -> FloatArray:
        """Softmax probabilities for ``batch``; see :class:`~stream_app.inference.base.Engine`."""
        torch = self._torch
        if batch.size == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if batch.seq_len > self._max_length:
            raise EngineError(f"batch of {batch.seq_len} tokens exceeds the model's {self._max_length}")
        cuda = self._device.type == "cuda"
        try:
            with torch.inference_mode(), self._attention():
                inputs = {
                    "input_ids": torch.from_numpy(batch.input_ids),
                    "attention_mask": torch.from_numpy(batch.attention_mask),
                }
                if self._uses_token_types and batch.token_type_ids is not None:
                    inputs["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
                if cuda:
                    inputs = {k: v.pin_memory().to(self._device, non_blocking=True) for k, v in inputs.items()}
                logits = self._model(**inputs).logits
                # Softmax on the device in float32: fp16 logits would lose the small probabilities.
                probs = torch.softmax(logits.float(), dim=-1)
                out: FloatArray = probs.cpu().numpy()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise DeviceOutOfMemoryError(f"CUDA out of memory on {batch.size} rows x {batch.seq_len} tokens") from exc
        except RuntimeError as exc:
            raise EngineError(f"torch forward failed: {exc}") from exc
        return out

    def close(self) -> None:
        """Drop the model and return cached device memory."""
        self._model = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
