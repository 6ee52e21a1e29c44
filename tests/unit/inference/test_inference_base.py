"""Engine-independent pieces: identity, labels, softmax, OOM split-and-retry, memory budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.errors import DeviceOutOfMemoryError, ModelError
from stream_app.inference.base import (
    EngineInfo,
    FloatArray,
    labels_from_config,
    memory_token_budget,
    model_identity,
    predict_split,
    softmax,
)
from stream_app.inference.tokenize import EncodedBatch, TextEncoder

pytestmark = pytest.mark.unit


class OomAbove:
    """Wraps an engine and raises DeviceOutOfMemoryError for batches of more than ``limit`` rows."""

    def __init__(self, inner: object, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.info: EngineInfo = inner.info  # type: ignore[attr-defined]
        self.labels: tuple[str, ...] = inner.labels  # type: ignore[attr-defined]
        self.sizes: list[int] = []
        self.ok_sizes: list[int] = []

    def predict(self, batch: EncodedBatch) -> FloatArray:
        self.sizes.append(batch.size)
        if batch.size > self.limit:
            raise DeviceOutOfMemoryError(f"{batch.size} rows")
        result: FloatArray = self.inner.predict(batch)  # type: ignore[attr-defined]
        self.ok_sizes.append(batch.size)
        return result

    def close(self) -> None:
        pass


# --- identity and labels ---------------------------------------------------------------------------


def test_identity_is_stable_and_survives_a_copy(tiny_model: Path, tmp_path: Path) -> None:
    name, version = model_identity(tiny_model)
    assert model_identity(tiny_model) == (name, version)
    assert len(version) == 12 and int(version, 16) >= 0
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert model_identity(copy)[1] == version


def test_identity_changes_with_weights_and_config(tiny_model: Path, tmp_path: Path) -> None:
    _, version = model_identity(tiny_model)
    weights = shutil.copytree(tiny_model, tmp_path / "w")
    data = bytearray((weights / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor, same size
    (weights / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(weights)[1] != version

    config = shutil.copytree(tiny_model, tmp_path / "c")
    cfg = json.loads((config / "config.json").read_text())
    cfg["hidden_dropout_prob"] = 0.3
    (config / "config.json").write_text(json.dumps(cfg))
    assert model_identity(config)[1] != version


def test_model_card_version_wins(tiny_model: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    (folder / "model_card.json").write_text(json.dumps({"name": "emotion-minilm", "version": "2024.1"}))
    assert model_identity(folder) == ("emotion-minilm", "2024.1")


def test_identity_of_a_non_model_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        model_identity(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="weights"):
        model_identity(tmp_path)


def test_labels_come_in_id_order() -> None:
    config = {"id2label": {"2": "c", "0": "a", "1": "b"}}
    assert labels_from_config(config) == ("a", "b", "c")


@pytest.mark.parametrize(
    "id2label", [{}, {"0": "a", "2": "c"}, {"x": "a"}, None], ids=["empty", "gap", "non-int", "missing"]
)
def test_bad_id2label_is_a_model_error(id2label: object) -> None:
    with pytest.raises(ModelError):
        labels_from_config({"id2label": id2label})


# --- softmax -----------------------------------------------------------------------------------------


def test_softmax_rows_sum_to_one_and_input_is_untouched() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    before = logits.copy()
    probs = softmax(logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[1], 1 / 3, rtol=1e-6)
    assert probs[0, 0] == pytest.approx(1.0)
    assert (logits == before).all()


def test_softmax_of_fp16_logits() -> None:
    probs = softmax(np.array([[2.0, 1.0]], dtype=np.float16))
    assert probs.dtype == np.float32
    assert probs[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-3)


# --- OOM split-and-retry -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(min_value=1, max_value=40), limit=st.integers(min_value=1, max_value=16))
def test_split_returns_every_row_in_order(
    encoder: TextEncoder, texts: tuple[str, ...], fake_engine: type[Any], rows: int, limit: int
) -> None:
    sample = [texts[i % len(texts)] + f" {i}" for i in range(rows)]
    batch = encoder(sample)
    expected = fake_engine().predict(batch)
    ooms: list[int] = []
    flaky = OomAbove(fake_engine(), limit)
    got = predict_split(flaky, batch, lambda: ooms.append(1))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert sum(flaky.ok_sizes) == rows, "each row is predicted exactly once"
    assert max(flaky.ok_sizes) <= limit
    assert len(ooms) == sum(1 for size in flaky.sizes if size > limit)
    assert (len(ooms) > 0) == (rows > limit)


def test_split_matches_an_unsplit_real_engine(tiny_model: Path, encoder: TextEncoder, texts: tuple[str, ...]) -> None:
    from stream_app.inference.torch_engine import TorchEngine

    engine = TorchEngine(tiny_model, num_threads=1)
    batch = encoder(texts)
    expected = engine.predict(batch)
    got = predict_split(OomAbove(engine, 3), batch)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_single_row_that_still_ooms_reraises(encoder: TextEncoder, fake_engine: type[Any]) -> None:
    calls: list[int] = []
    with pytest.raises(DeviceOutOfMemoryError):
        predict_split(OomAbove(fake_engine(), 0), encoder(["a", "b", "c"]), lambda: calls.append(1))
    assert calls, "on_oom is called before giving up"


def test_other_errors_are_not_split(encoder: TextEncoder, fake_engine: type[Any]) -> None:
    class Broken(fake_engine):  # type: ignore[misc,valid-type]
        def predict(self, batch: EncodedBatch) -> FloatArray:
            self.calls.append((batch.size, batch.seq_len))
            raise ValueError("bug")

    broken = Broken()
    with pytest.raises(ValueError):
        predict_split(broken, encoder(["a", "b"]))
    assert len(broken.calls) == 1


# --- memory budget -----------------------------------------------------------------------------------


def test_memory_budget_is_none_on_cpu(fake_engine: type[Any]) -> None:
    assert memory_token_budget(fake_engine()) is None


def test_memory_budget_on_cuda_uses_free_memory(monkeypatch: pytest.MonkeyPatch, fake_engine: type[Any]) -> None:
    import torch

    free = 8 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 << 30))
    engine = fake_engine()
    engine.info = EngineInfo("torch", "torch", "fp16", "cuda:0", "tiny", "v1")
    engine.bytes_per_token = 32 * 1024
    assert memory_token_budget(engine, headroom=0.5) == free // 2 // (32 * 1024)
    assert memory_token_budget(engine, headroom=0.5, ceiling=1000) == 1000
    assert memory_token_budget(engine, headroom=0.25) == free // 4 // (32 * 1024)
    free = 1 << 30
    assert memory_token_budget(engine, headroom=0.5) == free // 2 // (32 * 1024), "reads free memory each call"


def test_labels_fixture_matches_config(tiny_model: Path, labels: tuple[str, ...]) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert labels_from_config(config) == labels
