"""Inference engines: tokenisation, the Engine interface, PyTorch and ONNX Runtime, selection and start-up.

Importing this package is cheap (numpy only): onnxruntime, torch and transformers are imported when an
engine that needs them is loaded, and an ONNX engine never imports torch or transformers. The worker calls
:func:`start_engine`.
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
from stream_app.inference.fallback import FallbackEngine
from stream_app.inference.onnx_engine import OnnxEngine
from stream_app.inference.onnx_export import INT8_SCHEME, convert_fp16, export_fp32, quantize_int8
from stream_app.inference.parity import (
    Invariance,
    ParityResult,
    ReferenceProbs,
    batch_invariance,
    check_parity,
    default_parity_texts,
)
from stream_app.inference.select import (
    BUILTIN_PARITY_TEXTS,
    CandidateResult,
    Selection,
    SelectionReport,
    load_engine,
    resolve_device,
    select_engine,
    warm_up,
)
from stream_app.inference.startup import PHASES, EngineStart, start_engine
from stream_app.inference.tokenize import Encoded, EncodedBatch, TextEncoder, pad
from stream_app.inference.torch_engine import TorchEngine

__all__ = [
    "BUILTIN_PARITY_TEXTS",
    "INT8_SCHEME",
    "PHASES",
    "CandidateResult",
    "Encoded",
    "EncodedBatch",
    "Engine",
    "EngineInfo",
    "EngineStart",
    "FallbackEngine",
    "Invariance",
    "OnnxEngine",
    "ParityResult",
    "ReferenceProbs",
    "Selection",
    "SelectionReport",
    "TextEncoder",
    "TorchEngine",
    "batch_invariance",
    "check_parity",
    "convert_fp16",
    "default_parity_texts",
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
    "select_engine",
    "softmax",
    "start_engine",
    "warm_up",
]
