"""The served INT8 model stays within one point of PyTorch fp32 on GoEmotions dev, and passes the gate.

Needs the built model and the dev split (``scripts/setup.sh`` makes both); skipped without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.inference.onnx_engine import OnnxEngine
from stream_app.inference.parity import default_parity_texts
from stream_app.inference.select import INVARIANCE_TOLERANCE, select_engine
from stream_app.inference.tokenize import EncodedBatch
from stream_app.model.data import load_labels, load_split
from stream_app.model.evaluate import label_mapping, predict_logits, score_predictions
from stream_app.settings import load_settings

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def built() -> tuple[Path, Path, Path]:
    """``(model folder, dev.tsv, cache dir)`` of the default build, or skip."""
    from stream_app.model.train import resolve_default_model

    settings = load_settings()
    model = resolve_default_model(settings.data.goemotions_dir, settings.data.cache_dir)
    dev = settings.data.goemotions_dir / "dev.tsv"
    if model is None or not dev.is_file():
        pytest.skip("needs the built model and the GoEmotions dev split (scripts/setup.sh)")
    return Path(model), dev, settings.data.cache_dir


def test_int8_dev_accuracy_is_within_one_point_of_pytorch(built: tuple[Path, Path, Path]) -> None:
    from transformers import AutoTokenizer

    model, dev, cache = built
    card = json.loads((model / "model_card.json").read_text())
    torch_top1 = float(card["dev"]["top1_accuracy"])  # measured by the build with PyTorch fp32, 128 tokens
    assert int(card["dev"]["max_length"]) == 128
    labels = load_labels(dev.parent / "labels.txt")
    examples = load_split(dev, len(labels))
    engine = OnnxEngine(model, "int8", "cpu", 2, cache_dir=cache)

    def predict(feed: dict[str, Any]) -> np.ndarray:
        ids = feed["input_ids"]
        return engine.predict(EncodedBatch(ids, feed["attention_mask"], feed.get("token_type_ids"), 0, ids.size))

    scores = predict_logits(
        predict,
        AutoTokenizer.from_pretrained(str(model)),
        [e.text for e in examples],
        batch_size=64,
        max_length=128,
        progress=False,
    )
    mapping = label_mapping(labels, engine.labels)
    top1 = score_predictions([e.label_ids for e in examples], scores[:, mapping].argmax(axis=1), labels)[0]
    assert abs(top1 - torch_top1) <= 0.01, f"INT8 top-1 {top1:.4f} vs PyTorch fp32 {torch_top1:.4f}"


def test_int8_passes_the_default_parity_gate(built: tuple[Path, Path, Path]) -> None:
    model, _, cache = built
    settings = load_settings().model
    selection = select_engine(
        model,
        engine="onnx-int8",
        device="cpu",
        num_threads=1,
        cache_dir=cache,
        parity_texts=default_parity_texts()[: settings.parity_sample_size],
        min_top1_agreement=settings.parity_min_top1_agreement,
        max_prob_diff=settings.parity_max_prob_diff,
    )
    assert selection.engine.info.name == "onnx-int8", selection.report.fallback_reasons
    assert selection.fallbacks == ()
    (int8,) = selection.report.candidates
    assert int8.batch_invariance is not None and int8.batch_invariance <= INVARIANCE_TOLERANCE
