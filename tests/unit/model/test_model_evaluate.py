from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stream_app.errors import ModelError
from stream_app.model.commands import model as model_group
from stream_app.model.data import load_split
from stream_app.model.evaluate import evaluate, format_report, label_mapping, score_predictions

pytestmark = pytest.mark.unit


def test_score_predictions_by_hand() -> None:
    gold = [(0,), (1,), (1,), (0, 2), (2,)]
    pred = np.array([0, 1, 0, 2, 1])
    top1, macro, per_class, confusion, n_single = score_predictions(gold, pred, ("a", "b", "c"))
    assert top1 == pytest.approx(3 / 5)
    assert n_single == 4
    assert confusion == ((1, 0, 0), (1, 1, 0), (0, 1, 0))
    # a: P 1/2 R 1 F1 2/3; b: P 1/2 R 1/2 F1 1/2; c: P 0 R 0 F1 0
    assert [round(c.f1, 4) for c in per_class] == [0.6667, 0.5, 0.0]
    assert macro == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert [c.support for c in per_class] == [1, 2, 1]


def test_label_mapping_is_by_name() -> None:
    assert label_mapping(["a", "b"], ["B", "x", "A"]) == [2, 0]
    with pytest.raises(ModelError, match="LABEL_0"):
        label_mapping(["anger"], ["LABEL_0", "LABEL_1"])


@pytest.mark.parametrize("rotate", [0, 2], ids=["same order", "other order"])
def test_biased_model_scores_the_share_of_its_label(
    dataset: Path, tmp_path: Path, rotate: int, labels: tuple[str, ...], tiny_classifier: Callable[..., Path]
) -> None:
    order = labels[rotate:] + labels[:rotate]  # rotate=2 puts joy at model id 1, not 3
    folder = tiny_classifier(tmp_path / "tiny", label_order=order, always="joy")
    tsv = dataset / "dev.tsv"
    rows = load_split(tsv, len(labels))
    joy = labels.index("joy")

    report = evaluate(folder, tsv, progress=False, batch_size=16)

    assert report.n == len(rows)
    assert report.top1_accuracy == pytest.approx(np.mean([joy in r.label_ids for r in rows]))
    single = [r for r in rows if len(r.label_ids) == 1]
    assert report.n_single == len(single)
    by_label = {c.label: c for c in report.per_class}
    assert by_label["joy"].recall == pytest.approx(1.0)
    assert by_label["joy"].precision == pytest.approx(np.mean([r.label_ids == (joy,) for r in single]))
    assert all(c.recall == 0.0 for c in report.per_class if c.label != "joy")
    assert [row[joy] for row in report.confusion] == [c.support for c in report.per_class]
    table = format_report(report)
    assert "joy" in table and "top-1 accuracy" in table


def test_extra_model_labels_are_ignored(
    dataset: Path, tmp_path: Path, labels: tuple[str, ...], tiny_classifier: Callable[..., Path]
) -> None:
    order = (*labels, "confusion")
    folder = tiny_classifier(tmp_path / "tiny", label_order=order, always="confusion")
    report = evaluate(folder, dataset / "dev.tsv", progress=False)
    assert report.ignored_model_labels == ("confusion",)
    assert report.per_class[0].label == "anger"


def test_evaluate_command_prints_table_and_writes_json(
    dataset: Path, tmp_path: Path, labels: tuple[str, ...], tiny_classifier: Callable[..., Path]
) -> None:
    folder = tiny_classifier(tmp_path / "tiny", always="neutral")
    env = {
        "EMOTION_STREAM_DATA__GOEMOTIONS_DIR": str(dataset),
        "EMOTION_STREAM_DATA__CACHE_DIR": str(tmp_path / "cache"),
    }
    result = CliRunner().invoke(model_group, ["evaluate", str(folder), "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    assert "neutral" in result.output
    saved = folder / "eval" / "dev.json"
    assert f"report: {saved}" in result.output
    data = json.loads(saved.read_text())
    rows = load_split(dataset / "dev.tsv", len(labels))
    expected = np.mean([labels.index("neutral") in r.label_ids for r in rows])
    assert data["top1_accuracy"] == pytest.approx(expected)


def test_evaluate_command_reports_a_bad_model(dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        model_group,
        ["evaluate", str(tmp_path / "missing"), "--tsv", str(dataset / "dev.tsv"), "--no-progress"],
        env={"EMOTION_STREAM_DATA__CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.exit_code != 0
    assert "cannot load" in result.output
