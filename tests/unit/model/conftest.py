"""Shared fixtures for the model tests: a small synthetic GoEmotions-format data folder and a tiny,
randomly initialised BERT classifier whose predictions the test controls."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

_CUES = {
    "anger": ["furious", "so angry", "livid", "raging mad", "pissed off"],
    "disgust": ["gross", "disgusting", "revolting", "nasty", "vile"],
    "fear": ["terrified", "so scared", "afraid", "frightened", "panicking"],
    "joy": ["so happy", "thrilled", "delighted", "love this", "wonderful"],
    "neutral": ["the bus leaves at nine", "it is on page four", "he works in sales", "see the docs", "noted"],
    "sadness": ["heartbroken", "so sad", "crying", "miserable", "lonely"],
    "surprise": ["wow no way", "shocked", "unexpected", "astonished", "did not see that coming"],
}
_FRAMES = ["I am {}", "honestly {}", "{} right now", "this is {}", "{} lol", "ugh {} today", "{} tbh"]


def write_dataset(folder: Path, *, n_train: int = 280, n_dev: int = 70, seed: int = 0) -> Path:
    """Write labels.txt, train.tsv and dev.tsv with cue words per label (and ~10% two-label rows)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")

    def rows(n: int, prefix: str) -> str:
        lines = []
        for i in range(n):
            a = i % len(LABELS)
            text = rng.choice(_FRAMES).format(rng.choice(_CUES[LABELS[a]]))
            ids = [a]
            if i % 10 == 9:
                b = (a + 3) % len(LABELS)
                text += " and " + rng.choice(_CUES[LABELS[b]])
                ids.append(b)
            lines.append(f"{text}\t{','.join(map(str, sorted(ids)))}\t{prefix}{i:05d}")
        return "\n".join(lines) + "\n"

    (folder / "train.tsv").write_text(rows(n_train, "tr"))
    (folder / "dev.tsv").write_text(rows(n_dev, "dv"))
    return folder


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


def make_tiny_classifier(
    folder: Path, *, label_order: tuple[str, ...] = LABELS, always: str | None = None, seed: int = 0
) -> Path:
    """Save a tiny random BERT classifier with the base encoder's tokenizer.

    ``label_order`` is the model's own id order; ``always`` biases the head so every text gets that label.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stream_app.model.train import base_encoder_dir

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_encoder_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
        num_labels=len(label_order),
        id2label=dict(enumerate(label_order)),
        label2id={name: i for i, name in enumerate(label_order)},
    )
    model = BertForSequenceClassification(config).eval()
    if always is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[label_order.index(always)] = 10.0
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def labels() -> tuple[str, ...]:
    return LABELS


@pytest.fixture(scope="session")
def dataset_writer() -> object:
    """The :func:`write_dataset` helper, for fixtures with a wider scope than ``dataset``."""
    return write_dataset


@pytest.fixture(scope="session")
def tiny_classifier() -> object:
    """The :func:`make_tiny_classifier` factory (fixtures keep the helpers import-mode independent)."""
    return make_tiny_classifier
