"""Export a sequence-classification checkpoint to ONNX, and derive its INT8 and FP16 variants.

INT8 is :data:`INT8_SCHEME`: 8-bit weights in blocks of 32 along the input dimension (ONNX Runtime's
``MatMulNBits``) computed with int8 activations quantised per row and block (``accuracy_level=4``). Every
scale depends on one token's own values, so a message's scores do not depend on the messages that share
its batch or on the batch's padded width. The earlier scheme, ``quantize_dynamic``
(:func:`quantize_int8_dynamic`, kept for comparisons), quantises each activation tensor with one scale
for the whole batch: two drains of the same 8,000 messages disagreed on 1.1 % of labels.

Every function writes to a temporary file beside the target and renames it into place only after ONNX
Runtime has loaded (and, for the fp32 export, agreed with PyTorch on) the new file, so a reader never sees
a half-written model and two workers exporting the same version at once both end with a valid file.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from stream_app.errors import EngineError, ModelError
from stream_app.inference._files import atomic_target
from stream_app.inference._optional import require
from stream_app.inference.base import read_model_config

__all__ = [
    "DYNAMIC_INT8_OPTIONS",
    "INT8_OPTIONS",
    "INT8_SCHEME",
    "ONNX_OPSET",
    "Fp32Export",
    "atomic_target",
    "convert_fp16",
    "export_fp32",
    "export_fp32_detailed",
    "quantize_int8",
    "quantize_int8_dynamic",
    "verify_onnx",
]

log = logging.getLogger(__name__)

ONNX_OPSET = 17
"""Opset of the export: LayerNormalization is native from 17, and ONNX Runtime 1.16+ runs it everywhere."""

INT8_SCHEME = "w8b32-rowa8-v1"
"""Names the INT8 recipe; part of the INT8 file's name (``model.int8.<scheme>.onnx``), so a file built by
another recipe (the old ``model.int8.onnx`` of ``quantize_dynamic``) is never taken for this one."""

INT8_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"scheme": INT8_SCHEME, "op": "MatMulNBits", "bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4}
)
"""The :func:`quantize_int8` settings. Block 32 with ``accuracy_level=4`` was the only tested setting that is
both fast and batch-invariant on this project's CPUs: block 128 runs rows through different kernels by
batch shape (scores moved by up to 0.008 between a text alone and in a batch), ``accuracy_level=0``
(fp32 compute) is invariant but no faster than fp32. On the built model's dev set: top-1 0.7221 against
PyTorch fp32's 0.7219, top-1 agreement 0.997, largest probability difference 0.025 (``docs/model.md``)."""

DYNAMIC_INT8_OPTIONS: Mapping[str, Any] = MappingProxyType({"weight_type": "QInt8", "per_channel": True})
"""The ``quantize_dynamic`` settings of :func:`quantize_int8_dynamic` (the scheme before
:data:`INT8_SCHEME`; batch-dependent)."""

_EXPORT_ATOL = 1e-3


@dataclass(frozen=True, slots=True)
class Fp32Export:
    """What :func:`export_fp32_detailed` wrote: the file, and the exporter (``torchscript`` or ``dynamo``)."""

    path: Path
    exporter: str


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(path: Path, feeds: dict[str, np.ndarray[Any, Any]] | None = None) -> np.ndarray[Any, Any] | None:
    """Load ``path`` in ONNX Runtime (CPU) and, given ``feeds``, return its first output.

    Raises:
        EngineError: ONNX Runtime cannot load or run the file.
    """
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph

    try:
        session = _session(path)
        if feeds is None:
            return None
        wanted = {i.name for i in session.get_inputs()}
        result: np.ndarray[Any, Any] = session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
    except (Fail, InvalidArgument, InvalidGraph, RuntimeError) as exc:
        raise EngineError(f"ONNX Runtime cannot run {path.name}: {exc}") from exc
    return result


def _dummy_inputs(with_token_types: bool, vocab_size: int = 30522) -> dict[str, np.ndarray[Any, Any]]:
    # Two rows of different lengths so the export sees real padding; ids clamped into the vocabulary.
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]], dtype=np.int64)
    ids = np.where(ids > 0, np.minimum(ids, max(1, vocab_size - 1)), 0)
    feeds = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    if with_token_types:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds


def export_fp32(model_path: str | Path, out_path: Path) -> Path:
    """Export the checkpoint at ``model_path`` to an fp32 ONNX file at ``out_path``; see
    :func:`export_fp32_detailed`, which also says which exporter succeeded."""
    return export_fp32_detailed(model_path, out_path).path


def export_fp32_detailed(model_path: str | Path, out_path: Path) -> Fp32Export:
    """Export the checkpoint at ``model_path`` to an fp32 ONNX file at ``out_path``.

    Inputs are ``input_ids``, ``attention_mask`` and, when the model takes them, ``token_type_ids``
    (int64, dynamic ``batch`` and ``sequence`` axes); the output is ``logits`` (float32, ``batch x labels``).
    The TorchScript exporter is tried first (fast, and its graph is the one ONNX Runtime's transformer
    fusions recognise); the ``torch.export`` based exporter is the fallback. The result must load in ONNX
    Runtime and match PyTorch's logits within 1e-3 before it replaces ``out_path``.

    Raises:
        ModelError: the checkpoint cannot be loaded.
        EngineError: neither exporter produced a file that ONNX Runtime runs correctly, or torch and
            transformers are not installed (extra ``torch``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch: Any = require("torch", "exporting a checkpoint to ONNX")
    transformers: Any = require("transformers", "exporting a checkpoint to ONNX")
    AutoModelForSequenceClassification = transformers.AutoModelForSequenceClassification

    config = read_model_config(model_path)
    try:
        # Eager attention: its explicit MatMul/Softmax pattern is what ONNX Runtime fuses into Attention.
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_path), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {model_path} for export: {exc}") from exc
    with_token_types = (
        "token_type_ids" in inspect.signature(model.forward).parameters and int(config.get("type_vocab_size", 0)) > 1
    )
    feeds = _dummy_inputs(with_token_types, int(config.get("vocab_size", 30522)))
    names = list(feeds)
    args = tuple(torch.from_numpy(feeds[name]) for name in names)
    with torch.inference_mode():
        expected = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.numpy()

    out_path = Path(out_path)
    errors: list[str] = []
    # Looked up per call (not by __name__) so a replaced exporter keeps its label.
    for label, exporter in (("torchscript", _export_torchscript), ("dynamo", _export_dynamo)):
        try:
            with atomic_target(out_path) as tmp:
                exporter(model, args, names, tmp)
                got = verify_onnx(tmp, feeds)
                diff = float(np.abs(np.asarray(got) - expected).max())
                if diff > _EXPORT_ATOL:
                    raise EngineError(f"logits differ from PyTorch by {diff:.2e}")
        except (EngineError, RuntimeError, TypeError, ValueError) as exc:
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            log.warning("ONNX export with %s failed: %s", label, exc)
            continue
        log.info("exported %s to %s with %s (max |logit diff| %.1e)", model_path, out_path, label, diff)
        return Fp32Export(out_path, label)
    raise EngineError(f"ONNX export of {model_path} failed: " + "; ".join(errors))


def _export_torchscript(model: Any, args: tuple[Any, ...], names: list[str], target: Path) -> None:
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see export_fp32); its deprecation notice is known.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            args,
            str(target),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _export_dynamo(model: Any, args: tuple[Any, ...], names: list[str], target: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=4096)
    shapes = {name: {0: batch, 1: sequence} for name in names}

    class _Logits(torch.nn.Module):
        """The HF forward with named tensor inputs, returning the logits tensor alone."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            _Logits(model).eval(),
            args,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=max(ONNX_OPSET, 18),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise EngineError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(target), external_data=False)


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextmanager
def _quiet_preprocessing_hint() -> Iterator[None]:
    """quantize_dynamic logs (on the root logger) a hint to run its optional pre-processing step; the
    result is judged by parity figures instead, so keep the hint off the user's console."""
    root = logging.getLogger()
    hint_filter = _DropPreprocessingHint()
    root.addFilter(hint_filter)
    try:
        yield
    finally:
        root.removeFilter(hint_filter)


def quantize_int8(src: Path, dst: Path) -> Path:
    """INT8 quantisation of an fp32 ONNX file by :data:`INT8_SCHEME` (see :data:`INT8_OPTIONS`).

    Every MatMul with a constant weight becomes a ``MatMulNBits`` node: weights symmetric 8-bit in
    blocks of 32 input channels, activations quantised to int8 per row and block when the node runs.
    Attention score products, embeddings and the classifier head's Gemm stay fp32.

    Raises:
        EngineError: quantisation failed or ONNX Runtime cannot load the result.
    """
    import onnx

    quantizer_class = _matmul_nbits_quantizer()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise EngineError(f"no ONNX model at {src}")
    with atomic_target(dst) as tmp:
        try:
            quantizer = quantizer_class(
                onnx.load(str(src)),
                bits=INT8_OPTIONS["bits"],
                block_size=INT8_OPTIONS["block_size"],
                is_symmetric=INT8_OPTIONS["symmetric"],
                accuracy_level=INT8_OPTIONS["accuracy_level"],
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
        except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
            raise EngineError(f"INT8 quantisation of {src} failed: {exc}") from exc
        verify_onnx(tmp)
    return dst


def _matmul_nbits_quantizer() -> Any:
    """``MatMulNBitsQuantizer``, imported without the side effect its module has on logging.

    The module calls ``logging.basicConfig(level=INFO)`` when imported and logs a line per graph node;
    a process that had not configured logging would inherit that root handler and level.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def quantize_int8_dynamic(src: Path, dst: Path) -> Path:
    """The previous INT8 scheme: dynamic quantisation (weights QInt8 per channel, activations per tensor).

    Kept for benchmarks and for the test that proves the batch-invariance check can fail: its activation
    scale is computed over the whole batch tensor (padding included), so a message's scores depend on the
    messages that share its batch. Not used by any engine.

    Raises:
        EngineError: quantisation failed or ONNX Runtime cannot load the result.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise EngineError(f"no ONNX model at {src}")
    with atomic_target(dst) as tmp:
        try:
            with _quiet_preprocessing_hint():
                quantize_dynamic(
                    src,
                    tmp,
                    weight_type=QuantType[DYNAMIC_INT8_OPTIONS["weight_type"]],
                    per_channel=DYNAMIC_INT8_OPTIONS["per_channel"],
                    # Fused/contrib nodes defeat shape inference; their outputs are float tensors.
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise EngineError(f"INT8 quantisation of {src} failed: {exc}") from exc
        verify_onnx(tmp)
    return dst


def convert_fp16(src: Path, dst: Path) -> Path:
    """An fp16 copy of an fp32 ONNX file for the CUDA execution provider, inputs and outputs unchanged.

    ONNX Runtime's transformer optimiser first fuses attention, layer norm and GELU (the fused fp16
    kernels are where the GPU speed comes from), then converts weights to fp16 while keeping int64
    inputs and float32 ``logits``. Models the optimiser does not know are converted without fusion.

    Raises:
        EngineError: the conversion failed.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise EngineError(f"no ONNX model at {src}")
    with atomic_target(dst) as tmp:
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, use_gpu=True)
            optimized.convert_float_to_float16(keep_io_types=True)
            optimized.save_model_to_file(str(tmp))
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("fused fp16 conversion failed (%s); converting without fusion", exc)
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise EngineError(f"fp16 conversion of {src} produced an invalid model: {exc}") from exc
    return dst
