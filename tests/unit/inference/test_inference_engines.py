"""PyTorch and ONNX Runtime engines on a tiny random BERT: outputs, parity, ONNX files, error mapping."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.errors import DeviceOutOfMemoryError, EngineError, ModelError
from stream_app.inference.base import model_identity
from stream_app.inference.onnx_engine import OnnxEngine, onnx_model_file
from stream_app.inference.onnx_export import (
    INT8_SCHEME,
    convert_fp16,
    export_fp32,
    quantize_int8,
    quantize_int8_dynamic,
)
from stream_app.inference.tokenize import EncodedBatch, TextEncoder
from stream_app.inference.torch_engine import TorchEngine

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def torch_engine(tiny_model: Path) -> TorchEngine:
    return TorchEngine(tiny_model, "cpu", "float32", num_threads=1)


@pytest.fixture(scope="module")
def onnx_fp32(tiny_model: Path, onnx_cache: Path) -> OnnxEngine:
    return OnnxEngine(tiny_model, "fp32", "cpu", num_threads=1, cache_dir=onnx_cache)


def test_torch_engine_outputs_probabilities(
    torch_engine: TorchEngine, batch: EncodedBatch, tiny_model: Path, labels: tuple[str, ...]
) -> None:
    probs = torch_engine.predict(batch)
    assert probs.shape == (batch.size, len(labels)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert torch_engine.labels == labels
    info = torch_engine.info
    assert (info.kind, info.precision, info.device) == ("torch", "fp32", "cpu")
    assert (info.model_name, info.model_version) == model_identity(tiny_model)
    assert info.runtime.startswith("torch-")
    assert len(set(probs.argmax(axis=1).tolist())) > 1, "the fixture model should not be constant"


def test_row_output_does_not_depend_on_batch_padding(
    torch_engine: TorchEngine, encoder: TextEncoder, texts: tuple[str, ...]
) -> None:
    together = torch_engine.predict(encoder(texts))
    alone = np.concatenate([torch_engine.predict(encoder([t])) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_empty_batch(torch_engine: TorchEngine, onnx_fp32: OnnxEngine, encoder: TextEncoder) -> None:
    for engine in (torch_engine, onnx_fp32):
        assert engine.predict(encoder.pad([])).shape == (0, 7)


def test_cpu_ignores_half_precision(tiny_model: Path) -> None:
    engine = TorchEngine(tiny_model, "cpu", "float16", num_threads=1)
    assert engine.info.precision == "fp32"


def test_torch_on_missing_cuda_is_an_engine_error(tiny_model: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EngineError, match="CUDA"):
        TorchEngine(tiny_model, "cuda", "float16")


def test_onnx_fp32_agrees_with_torch(
    onnx_fp32: OnnxEngine, torch_engine: TorchEngine, batch: EncodedBatch, tiny_model: Path
) -> None:
    expected = torch_engine.predict(batch)
    got = onnx_fp32.predict(batch)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert onnx_fp32.labels == torch_engine.labels
    info = onnx_fp32.info
    assert (info.kind, info.precision, info.device) == ("onnx", "fp32", "cpu")
    assert info.runtime.startswith("onnxruntime-")
    assert info.model_version == model_identity(tiny_model)[1]


def test_onnx_int8_is_close_to_torch(
    tiny_model: Path, onnx_cache: Path, torch_engine: TorchEngine, batch: EncodedBatch
) -> None:
    engine = OnnxEngine(tiny_model, "int8", "cpu", num_threads=1, cache_dir=onnx_cache)
    assert engine.model_file.name == f"model.int8.{INT8_SCHEME}.onnx"
    expected = torch_engine.predict(batch)
    got = engine.predict(batch)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    # A 32-wide random model is the worst case for 8-bit weights; a real one is far closer.
    assert np.abs(got - expected).max() < 0.2
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.75


def test_int8_graph_is_the_row_wise_scheme(tiny_model: Path, onnx_cache: Path) -> None:
    import onnx

    graph = onnx.load(str(onnx_model_file(tiny_model, "int8", onnx_cache))).graph
    ops = [node.op_type for node in graph.node]
    weights = {t.name: t for t in graph.initializer}
    assert "MatMulInteger" in ops
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights], "every weight is int8"
    assert not set(ops) & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"}, "no scale shared by the batch"
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            axis = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"]
            assert axis == [0], "one scale per row"
    int8 = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert all(weights[n.input[1]].data_type == onnx.TensorProto.INT8 for n in int8)
    # query, key and value read the same tensor and share its quantisation: fewer quantisations than MatMuls
    assert ops.count("QuantizeLinear") < len(int8)


def test_an_old_int8_file_is_never_used_for_the_new_scheme(tiny_model: Path, tmp_path: Path) -> None:
    """A cache or model folder holding the old dynamic ``model.int8.onnx`` gets a new file built beside it."""
    cache, folder = tmp_path / "cache", shutil.copytree(tiny_model, tmp_path / "model")
    fp32 = onnx_model_file(folder, "fp32", cache)
    version = model_identity(folder)[1]
    for old in (cache / "onnx" / version / "model.int8.onnx", folder / "onnx" / "model.int8.onnx"):
        old.parent.mkdir(parents=True, exist_ok=True)
        quantize_int8_dynamic(fp32, old)
    engine = OnnxEngine(folder, "int8", num_threads=1, cache_dir=cache)
    assert engine.model_file == cache / "onnx" / version / f"model.int8.{INT8_SCHEME}.onnx"


def test_onnx_without_token_type_ids_in_batch(onnx_fp32: OnnxEngine, batch: EncodedBatch) -> None:
    without = EncodedBatch(batch.input_ids, batch.attention_mask, None, batch.real_tokens, batch.padded_tokens)
    np.testing.assert_allclose(onnx_fp32.predict(without), onnx_fp32.predict(batch), atol=1e-6)


def test_export_goes_to_cache_by_version_and_is_reused(tiny_model: Path, onnx_cache: Path) -> None:
    version = model_identity(tiny_model)[1]
    path = onnx_model_file(tiny_model, "fp32", onnx_cache)
    assert path == onnx_cache / "onnx" / version / "model.onnx"
    mtime = path.stat().st_mtime_ns
    assert onnx_model_file(tiny_model, "fp32", onnx_cache).stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "no temp files left"


def test_shipped_onnx_file_wins(tiny_model: Path, onnx_cache: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    (folder / "onnx").mkdir()
    shutil.copy(onnx_model_file(tiny_model, "fp32", onnx_cache), folder / "onnx" / "model.onnx")
    engine = OnnxEngine(folder, "fp32", num_threads=1)  # no cache_dir needed
    assert engine.model_file == folder / "onnx" / "model.onnx"


def test_missing_onnx_without_cache_dir_is_an_engine_error(tiny_model: Path) -> None:
    with pytest.raises(EngineError, match="cache_dir"):
        OnnxEngine(tiny_model, "fp32", num_threads=1)


@pytest.mark.parametrize(
    ("precision", "device", "match"),
    [("fp16", "cpu", "CUDA"), ("int8", "cuda", "CPU"), ("fp32", "tpu", "device")],
)
def test_unsupported_onnx_combinations(
    tiny_model: Path, onnx_cache: Path, precision: Any, device: str, match: str
) -> None:
    with pytest.raises(EngineError, match=match):
        OnnxEngine(tiny_model, precision, device, cache_dir=onnx_cache)


def test_onnx_cuda_without_onnxruntime_gpu_says_so(tiny_model: Path, onnx_cache: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        OnnxEngine(tiny_model, "fp16", "cuda", cache_dir=onnx_cache)


def test_export_rejects_a_non_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        export_fp32(tmp_path, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_quantize_missing_source(tmp_path: Path) -> None:
    with pytest.raises(EngineError):
        quantize_int8(tmp_path / "nope.onnx", tmp_path / "out.onnx")


def test_fp16_conversion_keeps_float32_io(tiny_model: Path, onnx_cache: Path, tmp_path: Path) -> None:
    import onnx

    src = onnx_model_file(tiny_model, "fp32", onnx_cache)
    dst = convert_fp16(src, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(dst))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    (logits,) = model.graph.output
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.name for i in model.graph.input} >= {"input_ids", "attention_mask"}


class _RaisingSession:
    def __init__(self, message: str) -> None:
        self.message = message

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.message)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Failed to allocate memory for requested buffer of size 123", DeviceOutOfMemoryError),
        ("BFCArena::AllocateRawInternal Available memory of 0 is smaller than requested", DeviceOutOfMemoryError),
        ("Invalid rank for input: input_ids", EngineError),
    ],
)
def test_onnx_run_errors_are_translated(
    tiny_model: Path, onnx_cache: Path, batch: EncodedBatch, message: str, expected: type[Exception]
) -> None:
    engine = OnnxEngine(tiny_model, "fp32", num_threads=1, cache_dir=onnx_cache)
    engine._session = _RaisingSession(message)
    with pytest.raises(expected) as caught:
        engine.predict(batch)
    assert caught.type is expected


def test_torch_cuda_oom_is_translated(tiny_model: Path, batch: EncodedBatch, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    engine = TorchEngine(tiny_model, num_threads=1)

    def oom(**kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    engine._model = oom
    with pytest.raises(DeviceOutOfMemoryError):
        engine.predict(batch)


def test_overlong_batch_is_an_engine_error(torch_engine: TorchEngine) -> None:
    ids = np.ones((1, 200), dtype=np.int64)  # the tiny model has 128 positions
    with pytest.raises(EngineError, match="128"):
        torch_engine.predict(EncodedBatch(ids, ids.copy(), None, 200, 200))


@pytest.mark.slow
def test_export_falls_back_to_the_dynamo_exporter(
    tiny_model: Path, tmp_path: Path, batch: EncodedBatch, torch_engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_app.inference import onnx_export

    def broken(*args: Any) -> None:
        raise RuntimeError("simulated TorchScript exporter failure")

    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    out = export_fp32(tiny_model, tmp_path / "model.onnx")
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    (folder / "onnx").mkdir()
    shutil.copy(out, folder / "onnx" / "model.onnx")
    got = OnnxEngine(folder, "fp32", num_threads=1).predict(batch)
    np.testing.assert_allclose(got, torch_engine.predict(batch), atol=1e-5)


def test_export_that_fails_everywhere_leaves_no_file(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_app.inference import onnx_export

    def broken(model: Any, args: Any, names: Any, target: Path) -> None:
        target.write_bytes(b"not an onnx model")
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    with pytest.raises(EngineError, match="simulated"):
        export_fp32(tiny_model, tmp_path / "out" / "model.onnx")
    assert list((tmp_path / "out").iterdir()) == []
