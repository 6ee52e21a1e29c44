"""Engine selection: the parity gate, fallback on load and at run time, the CUDA plan, warm-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.errors import DeviceOutOfMemoryError, EngineError
from stream_app.inference import onnx_engine
from stream_app.inference.base import FloatArray
from stream_app.inference.select import (
    FallbackEngine,
    _plan,
    check_parity,
    load_engine,
    resolve_device,
    warm_up,
)
from stream_app.inference.tokenize import EncodedBatch, TextEncoder
from stream_app.inference.torch_engine import TorchEngine

pytestmark = pytest.mark.unit

Calls = list[tuple[str, str, str]]


class _PermutedOnnx(onnx_engine.OnnxEngine):
    """An ONNX engine whose label columns are rotated: loads fine, answers wrongly."""

    def predict(self, batch: EncodedBatch) -> FloatArray:
        return np.roll(super().predict(batch), 1, axis=1)


class _NoisyOnnx(onnx_engine.OnnxEngine):
    """Top-1 stays (mostly) right, but probabilities move by up to 0.2."""

    def predict(self, batch: EncodedBatch) -> FloatArray:
        probs = super().predict(batch)
        probs[:, 0] += 0.2
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


class _FailsToLoad:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EngineError("simulated: libonnxruntime.so is broken")


# --- the gate itself ---------------------------------------------------------------------------------


def _select(model: Path, cache: Path, texts: tuple[str, ...], engine: Any) -> tuple[Any, Any, Calls]:
    """load_engine on the CPU with one thread, recording every on_fallback call."""
    calls: Calls = []
    chosen, report = load_engine(
        model,
        engine=engine,
        device="cpu",
        num_threads=1,
        cache_dir=cache,
        parity_texts=texts,
        on_fallback=lambda *args: calls.append(args),
    )
    return chosen, report, calls


def test_check_parity_thresholds() -> None:
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32)
    same = check_parity(ref.copy(), ref, min_top1_agreement=0.97, max_prob_diff=0.1)
    assert same.passed and same.top1_agreement == 1.0 and same.max_prob_diff == 0.0
    flipped = check_parity(ref[::-1].copy(), ref, min_top1_agreement=0.97, max_prob_diff=1.0, tie_margin=0.05)
    assert not flipped.passed and flipped.top1_agreement == 0.0 and "agreement" in (flipped.reason or "")
    assert flipped.decisive_agreement == 0.0 and flipped.near_tie_flips == 0
    shifted = ref + np.array([0.15, -0.15, 0.0], dtype=np.float32)
    drift = check_parity(shifted, ref, min_top1_agreement=0.97, max_prob_diff=0.1)
    assert not drift.passed and drift.top1_agreement == 1.0 and "|dp|" in (drift.reason or "")
    assert not check_parity(np.full_like(ref, np.nan), ref, min_top1_agreement=0, max_prob_diff=1).passed
    assert not check_parity(ref[:1], ref, min_top1_agreement=0, max_prob_diff=1).passed


def test_near_tie_flips_are_excused_but_clear_flips_are_not() -> None:
    ref = np.array([[0.46, 0.44, 0.10], [0.10, 0.85, 0.05], [0.2, 0.1, 0.7]], dtype=np.float32)
    near_tie = ref.copy()
    near_tie[0] = [0.44, 0.46, 0.10]  # the reference preferred label 0 by only 0.02
    result = check_parity(near_tie, ref, min_top1_agreement=0.97, max_prob_diff=0.1)
    assert result.passed and result.near_tie_flips == 1
    assert result.top1_agreement == pytest.approx(2 / 3) and result.decisive_agreement == 1.0
    raw = check_parity(near_tie, ref, min_top1_agreement=0.97, max_prob_diff=0.1, tie_margin=0.0)
    assert not raw.passed and raw.decisive_agreement == pytest.approx(2 / 3)

    clear = ref.copy()
    clear[1] = [0.80, 0.15, 0.05]  # a confident 0.85 decision changed
    result = check_parity(clear, ref, min_top1_agreement=0.97, max_prob_diff=1.0, tie_margin=0.1)
    assert not result.passed and result.near_tie_flips == 0
    assert result.decisive_agreement == pytest.approx(2 / 3)


@pytest.mark.parametrize("broken", [_PermutedOnnx, _NoisyOnnx], ids=["permuted", "noisy"])
def test_perturbed_engine_fails_the_gate_and_falls_back(
    broken: type[onnx_engine.OnnxEngine],
    tiny_model: Path,
    onnx_cache: Path,
    texts: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(onnx_engine, "OnnxEngine", broken)
    engine, report, calls = _select(tiny_model, onnx_cache, texts, "onnx")
    assert engine.info.kind == "torch" and report.chosen.name == "torch"
    assert [(c[0], c[1]) for c in calls] == [("onnx", "torch")]
    assert calls[0][2].startswith("parity_failed: ")
    (onnx_result,) = [c for c in report.candidates if c.name == "onnx"]
    assert onnx_result.loaded and not onnx_result.passed
    assert onnx_result.top1_agreement is not None and onnx_result.max_prob_diff is not None
    assert onnx_result.top1_agreement < 0.97 or onnx_result.max_prob_diff > 0.1
    assert report.fallback_reasons and report.fallback_reasons[0].startswith("onnx -> torch: parity_failed")


def test_honest_onnx_passes_the_gate(tiny_model: Path, onnx_cache: Path, texts: tuple[str, ...]) -> None:
    engine, report, calls = _select(tiny_model, onnx_cache, texts, "onnx")
    assert engine.info.name == "onnx" and isinstance(engine, FallbackEngine)
    assert calls == []
    (result,) = report.candidates
    assert result.passed and result.top1_agreement == 1.0
    assert result.max_prob_diff is not None and result.max_prob_diff < 1e-4
    assert report.cold_start_s > 0 and report.selection_s >= report.cold_start_s
    json.dumps(report.as_dict())  # serialisable for logs and the benchmark


# --- fallback on load --------------------------------------------------------------------------------


def test_engine_that_fails_to_load_falls_back_to_torch(
    tiny_model: Path, onnx_cache: Path, texts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_engine, "OnnxEngine", _FailsToLoad)
    engine, report, calls = _select(tiny_model, onnx_cache, texts, "auto")
    assert engine.info.name == "torch" and isinstance(engine, TorchEngine)
    assert [(c[0], c[1]) for c in calls] == [("onnx-int8", "torch"), ("onnx", "torch")]
    assert all(c[2].startswith("load_failed: EngineError: simulated") for c in calls)
    assert [c.loaded for c in report.candidates] == [False, False, True]


def test_auto_picks_among_passing_candidates(tiny_model: Path, onnx_cache: Path, texts: tuple[str, ...]) -> None:
    # Loose thresholds: 8-bit weights on a 32-wide random model are the worst case (see engine tests).
    engine, report = load_engine(
        tiny_model,
        device="cpu",
        num_threads=1,
        cache_dir=onnx_cache,
        parity_texts=texts,
        min_top1_agreement=0.5,
        max_prob_diff=0.5,
    )
    names = [c.name for c in report.candidates]
    assert names == ["onnx-int8", "onnx", "torch"]
    assert all(c.passed and c.ms_per_batch is not None for c in report.candidates)
    fastest = min(report.candidates, key=lambda c: c.ms_per_batch or 0.0)
    assert report.chosen.name == fastest.name == engine.info.name
    first = load_engine(
        tiny_model,
        device="cpu",
        num_threads=1,
        cache_dir=onnx_cache,
        parity_texts=texts,
        min_top1_agreement=0.5,
        max_prob_diff=0.5,
        benchmark=False,
    )[1]
    assert first.chosen.name == "onnx-int8" and len(first.candidates) == 1


def test_explicit_torch_needs_no_parity(tiny_model: Path, texts: tuple[str, ...]) -> None:
    engine, report = load_engine(tiny_model, engine="torch", device="cpu", num_threads=1, parity_texts=texts)
    assert isinstance(engine, TorchEngine) and report.candidates[0].top1_agreement == 1.0


# --- fallback at run time ----------------------------------------------------------------------------


class _BreaksOnPredict:
    def __init__(self, inner: Any, error: Exception) -> None:
        self.inner = inner
        self.info = inner.info
        self.labels = inner.labels
        self.error = error
        self.calls = 0
        self.closed = False

    def predict(self, batch: EncodedBatch) -> FloatArray:
        self.calls += 1
        raise self.error

    def close(self) -> None:
        self.closed = True


def test_run_time_failure_switches_to_the_fallback_for_good(
    tiny_model: Path, fake_engine: type[Any], batch: EncodedBatch
) -> None:
    primary = _BreaksOnPredict(fake_engine(name="onnxruntime-x"), RuntimeError("CUDA kernel launch failed"))
    calls: Calls = []
    built: list[TorchEngine] = []

    def factory() -> TorchEngine:
        built.append(TorchEngine(tiny_model, num_threads=1))
        return built[-1]

    engine = FallbackEngine(primary, factory, lambda *args: calls.append(args))
    assert engine.info.kind == "onnx"
    got = engine.predict(batch)
    np.testing.assert_allclose(got, TorchEngine(tiny_model, num_threads=1).predict(batch), atol=1e-6)
    assert engine.info.kind == "torch" and engine.switched and primary.closed
    assert calls == [("onnx", "torch", "predict_failed: RuntimeError: CUDA kernel launch failed")]
    engine.predict(batch)
    assert primary.calls == 1 and len(built) == 1, "the switch is permanent"


def test_fallback_passes_oom_through(fake_engine: type[Any], batch: EncodedBatch) -> None:
    primary = _BreaksOnPredict(fake_engine(), DeviceOutOfMemoryError("full"))
    factory_calls: list[int] = []
    engine = FallbackEngine(primary, lambda: factory_calls.append(1) or fake_engine())
    with pytest.raises(DeviceOutOfMemoryError):
        engine.predict(batch)
    assert not engine.switched and factory_calls == []


def test_fallback_that_cannot_load_is_an_engine_error(fake_engine: type[Any], batch: EncodedBatch) -> None:
    def factory() -> Any:
        raise EngineError("no torch either")

    engine = FallbackEngine(_BreaksOnPredict(fake_engine(), ValueError("bad")), factory)
    with pytest.raises(EngineError, match="no torch either"):
        engine.predict(batch)


def test_fallback_with_other_labels_is_refused(fake_engine: type[Any], batch: EncodedBatch) -> None:
    engine = FallbackEngine(
        _BreaksOnPredict(fake_engine(), ValueError("bad")), lambda: fake_engine(labels=("pos", "neg"))
    )
    with pytest.raises(EngineError, match="labels"):
        engine.predict(batch)


# --- plans, devices, warm-up -------------------------------------------------------------------------


def test_cuda_plans_without_loading_anything(tiny_model: Path) -> None:
    def names(requested: Any, dtype: Any) -> list[str]:
        return [s.name for s in _plan(tiny_model, requested, "cuda:0", dtype, 0, None).candidates]

    assert names("auto", "float16") == ["onnx-fp16", "torch-fp16", "onnx", "torch"]
    assert names("auto", "bfloat16") == ["torch-bf16", "onnx", "torch"]
    assert names("auto", "float32") == ["onnx", "torch"]
    assert names("onnx", "float16") == ["onnx-fp16"]
    plan = _plan(tiny_model, "onnx-int8", "cuda:0", "float16", 0, None)
    assert [s.name for s in plan.candidates] == ["torch-fp16"]
    assert plan.unsupported and plan.unsupported[0][0] == "onnx-int8"
    assert [s.name for s in _plan(tiny_model, "auto", "cpu", "float16", 0, None).candidates] == [
        "onnx-int8",
        "onnx",
        "torch",
    ]


def test_resolve_device() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto").startswith("cuda")
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(EngineError):
            resolve_device("cuda")


def test_warm_up_runs_each_shape_once(fake_engine: type[Any], encoder: TextEncoder, texts: tuple[str, ...]) -> None:
    engine = fake_engine()
    seconds = warm_up(engine, encoder, list(texts) * 4, batch_sizes=(1, 8, 32), quantiles=(0.1, 0.5, 1.0))
    assert seconds >= 0
    assert len(engine.calls) == 9
    assert sorted({rows for rows, _ in engine.calls}) == [1, 8, 32]
    short = min(width for rows, width in engine.calls if rows == 1)
    long = max(width for rows, width in engine.calls if rows == 1)
    assert long > short, "length quantiles give different widths"
    assert warm_up(fake_engine(), encoder, []) == 0.0
