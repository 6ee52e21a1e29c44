"""A message's scores do not depend on its batch: companions, order, padded width, threads (issue 15).

Every mix below scores the same texts; each text's labels must be identical and its probabilities within
1e-5 of the text scored alone. The old dynamic INT8 model (one activation scale per batch tensor) fails
this check, which is what proves the check can fail.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.inference import onnx_engine
from stream_app.inference.base import Engine, FloatArray
from stream_app.inference.onnx_engine import OnnxEngine, onnx_model_file
from stream_app.inference.onnx_export import quantize_int8_dynamic
from stream_app.inference.parity import default_parity_texts
from stream_app.inference.select import load_engine
from stream_app.inference.tokenize import TextEncoder, pad
from stream_app.inference.torch_engine import TorchEngine

pytestmark = pytest.mark.unit

TOLERANCE = 1e-5


def score_in_mixes(engine: Engine, encoder: TextEncoder, texts: list[str], seed: int = 7) -> dict[str, FloatArray]:
    """Probabilities of ``texts`` (rows in text order) under several batch mixes; ``alone`` first."""
    items = encoder.encode(texts)
    n = len(items)
    rng = random.Random(seed)

    def run(groups: list[list[int]], extra: Callable[[], int] = lambda: 0) -> FloatArray:
        out = np.zeros((n, len(engine.labels)), dtype=np.float32)
        for group in groups:
            chosen = [items[i] for i in group]
            longest = max(item.n_tokens for item in chosen)
            width = min(longest + extra(), encoder.max_length) or None
            batch = pad(
                chosen, pad_id=encoder.pad_id, with_token_type_ids=encoder.with_token_type_ids, pad_to_multiple_of=width
            )
            out[group] = engine.predict(batch)
        return out

    by_length = sorted(range(n), key=lambda i: items[i].n_tokens)
    longest_text = by_length[-1]
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    random_groups: list[list[int]] = []
    while shuffled:
        size = rng.randint(1, 9)
        random_groups.append(shuffled[:size])
        shuffled = shuffled[size:]
    return {
        "alone": run([[i] for i in range(n)]),
        "one batch": run([list(range(n))]),
        "one batch reversed": run([list(reversed(range(n)))]),
        "sorted fours": run([by_length[i : i + 4] for i in range(0, n, 4)]),
        "random groups": run(random_groups),
        "random groups, padded wider": run(random_groups, lambda: rng.randint(1, 24)),
        "alone, padded 32 wider": run([[i] for i in range(n)], lambda: 32),
        "beside the longest text": run([[i, longest_text] if i != longest_text else [i] for i in range(n)]),
    }


def assert_batch_invariant(engine: Engine, encoder: TextEncoder, texts: list[str]) -> None:
    results = score_in_mixes(engine, encoder, texts)
    alone = results.pop("alone")
    for mix, probs in results.items():
        flips = np.flatnonzero(probs.argmax(axis=1) != alone.argmax(axis=1))
        assert not flips.size, f"{mix}: labels changed for {[texts[i] for i in flips]}"
        diff = float(np.abs(probs.astype(np.float64) - alone).max())
        assert diff <= TOLERANCE, f"{mix}: scores moved by up to {diff:.2e}"


# --- the tiny random model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mix_texts(texts: tuple[str, ...]) -> list[str]:
    return [*texts, "a", "I can't believe it " * 4, "ok ok ok", "why?"]


@pytest.mark.parametrize(("name", "threads"), [("torch", 1), ("onnx", 1), ("onnx-int8", 1), ("onnx-int8", 2)])
def test_each_cpu_engine_is_batch_invariant(
    name: str, threads: int, tiny_model: Path, onnx_cache: Path, encoder: TextEncoder, mix_texts: list[str]
) -> None:
    engine: Engine
    if name == "torch":
        engine = TorchEngine(tiny_model, "cpu", "float32", threads)
    else:
        precision: Any = "int8" if name == "onnx-int8" else "fp32"
        engine = OnnxEngine(tiny_model, precision, "cpu", threads, cache_dir=onnx_cache)
    assert_batch_invariant(engine, encoder, mix_texts)


def test_the_engine_auto_selects_on_a_cpu_is_batch_invariant(
    tiny_model: Path, onnx_cache: Path, encoder: TextEncoder, mix_texts: list[str], texts: tuple[str, ...]
) -> None:
    # Loose thresholds: 8-bit weights on a 32-wide random model are the worst case (see the engine tests).
    engine, report = load_engine(
        tiny_model,
        device="cpu",
        num_threads=1,
        cache_dir=onnx_cache,
        parity_texts=texts,
        min_top1_agreement=0.5,
        max_prob_diff=0.5,
    )
    assert all(c.batch_invariance is not None and c.batch_invariance <= TOLERANCE for c in report.candidates)
    assert_batch_invariant(engine, encoder, mix_texts)


@pytest.fixture(scope="module")
def dynamic_int8(tiny_model: Path, onnx_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous INT8 recipe (quantize_dynamic) of the tiny model."""
    target = tmp_path_factory.mktemp("dynamic") / "model.int8.onnx"
    return quantize_int8_dynamic(onnx_model_file(tiny_model, "fp32", onnx_cache), target)


def test_the_check_fails_on_the_old_dynamic_int8(
    tiny_model: Path, dynamic_int8: Path, encoder: TextEncoder, mix_texts: list[str]
) -> None:
    engine = OnnxEngine(tiny_model, "int8", "cpu", 1, model_file=dynamic_int8)
    with pytest.raises(AssertionError, match=r"scores moved|labels changed"):
        assert_batch_invariant(engine, encoder, mix_texts)


def test_selection_rejects_a_batch_dependent_engine(
    tiny_model: Path,
    onnx_cache: Path,
    dynamic_int8: Path,
    texts: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _DynamicInt8(OnnxEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, model_file=dynamic_int8)

    monkeypatch.setattr(onnx_engine, "OnnxEngine", _DynamicInt8)
    calls: list[tuple[str, str, str]] = []
    engine, report = load_engine(
        tiny_model,
        engine="onnx-int8",
        device="cpu",
        num_threads=1,
        cache_dir=onnx_cache,
        parity_texts=texts,
        min_top1_agreement=0.5,
        max_prob_diff=0.5,
        on_fallback=lambda *args: calls.append(args),
    )
    assert engine.info.name == "torch"
    ((from_engine, to_engine, reason),) = calls
    assert (from_engine, to_engine) == ("onnx-int8", "torch") and reason.startswith("nondeterministic: ")
    (int8,) = [c for c in report.candidates if c.name == "onnx-int8"]
    assert int8.loaded and not int8.passed and (int8.batch_invariance or 0.0) > TOLERANCE


# --- the built model (what the worker serves by default) -----------------------------------------------


@pytest.fixture(scope="module")
def built_model() -> Path:
    from stream_app.model.train import resolve_default_model
    from stream_app.settings import load_settings

    settings = load_settings()
    built = resolve_default_model(settings.data.goemotions_dir, settings.data.cache_dir)
    if built is None:
        pytest.skip("no built model (emotion-stream model build); the tiny-model tests above still ran")
    return Path(built)


def test_built_model_int8_is_batch_invariant_and_dynamic_int8_is_not(built_model: Path, tmp_path: Path) -> None:
    from stream_app.settings import load_settings

    cache = load_settings().data.cache_dir
    encoder = TextEncoder.from_pretrained(built_model, 128)
    texts = default_parity_texts()[:40]
    assert_batch_invariant(OnnxEngine(built_model, "int8", "cpu", 1, cache_dir=cache), encoder, texts)
    old = quantize_int8_dynamic(onnx_model_file(built_model, "fp32", cache), tmp_path / "model.int8.onnx")
    with pytest.raises(AssertionError, match=r"scores moved|labels changed"):
        assert_batch_invariant(OnnxEngine(built_model, "int8", "cpu", 1, model_file=old), encoder, texts)
