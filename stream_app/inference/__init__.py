"""Inference engines: tokenisation, the Engine interface, PyTorch and ONNX Runtime, auto-selection.

Importing this package is cheap: torch, transformers and onnxruntime are imported when an engine or the
tokenizer is first loaded, not here.
"""

from __future__ import annotations

from stream_app.inference.base import (
    Engine,
    EngineInfo,
    engine_name,
    labels_from_config,
    memory_token_budget,
    model_identity,
    predict_split,
    softmax,
)
from stream_app.inference.onnx_engine import OnnxEngine
from stream_app.inference.onnx_export import convert_fp16, export_fp32, quantize_int8
from stream_app.inference.select import (
    BUILTIN_PARITY_TEXTS,
    CandidateResult,
    FallbackEngine,
    ParityResult,
    SelectionReport,
    check_parity,
    load_engine,
    resolve_device,
    warm_up,
)
from stream_app.inference.tokenize import Encoded, EncodedBatch, TextEncoder, pad
from stream_app.inference.torch_engine import TorchEngine

__all__ = [
    "BUILTIN_PARITY_TEXTS",
    "CandidateResult",
    "Encoded",
    "EncodedBatch",
    "Engine",
    "EngineInfo",
    "FallbackEngine",
    "OnnxEngine",
    "ParityResult",
    "SelectionReport",
    "TextEncoder",
    "TorchEngine",
    "check_parity",
    "convert_fp16",
    "engine_name",
    "export_fp32",
    "labels_from_config",
    "load_engine",
    "memory_token_budget",
    "model_identity",
    "pad",
    "predict_split",
    "quantize_int8",
    "resolve_device",
    "softmax",
    "warm_up",
]
