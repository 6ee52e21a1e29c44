from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stream_app.model.commands import model as model_group
from stream_app.model.export import ExportReport, export_onnx, onnx_paths

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture
def tiny(tmp_path: Path, tiny_classifier: Callable[..., Path]) -> Path:
    return tiny_classifier(tmp_path / "tiny", seed=3)


def test_export_writes_both_variants_and_parity(tiny: Path, dataset: Path) -> None:
    report = export_onnx(tiny, dev_tsv=dataset / "dev.tsv", progress=False)

    fp32, int8, parity = onnx_paths(tiny)
    assert fp32.is_file() and int8.is_file() and parity.is_file()
    assert not [p for p in fp32.parent.iterdir() if p.name.startswith(".")]
    assert report.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert report.n == (dataset / "dev.tsv").read_text().count("\n")
    assert report.variant("fp32").top1_agreement == 1.0
    assert report.variant("fp32").max_abs_prob_diff < 1e-4
    assert report.variant("fp32").accuracy == pytest.approx(report.torch_accuracy)
    assert 0.0 <= report.variant("int8").top1_agreement <= 1.0
    assert report.variant("int8").size_bytes < report.variant("fp32").size_bytes
    stored = json.loads(parity.read_text())
    assert stored["variants"]["fp32"]["top1_agreement"] == 1.0
    assert set(stored["variants"]) == {"fp32", "int8"} and stored["exporter"] in {"torchscript", "dynamo"}
    assert ExportReport.from_dict(stored).variants == report.variants


def test_onnx_has_dynamic_axes_and_runs_other_shapes(tiny: Path) -> None:
    import onnxruntime as ort

    export_onnx(tiny, dev_tsv=None, progress=False)
    session = ort.InferenceSession(str(onnx_paths(tiny)[0]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch, seq in ((1, 3), (5, 40)):
        feed = {i.name: np.ones((batch, seq), dtype=np.int64) for i in session.get_inputs()}
        (logits,) = session.run(["logits"], feed)
        assert logits.shape == (batch, 7)


def test_export_is_idempotent_unless_forced_or_stale(tiny: Path) -> None:
    first = export_onnx(tiny, dev_tsv=None, progress=False)
    assert not first.skipped and first.source == "built-in sample"
    fp32 = onnx_paths(tiny)[0]
    mtime = fp32.stat().st_mtime_ns

    again = export_onnx(tiny, dev_tsv=None, progress=False)
    assert again.skipped and fp32.stat().st_mtime_ns == mtime
    assert again.variants == first.variants

    forced = export_onnx(tiny, dev_tsv=None, force=True, progress=False)
    assert not forced.skipped and fp32.stat().st_mtime_ns != mtime

    weights = tiny / "model.safetensors"  # newer weights make the export stale
    later = fp32.stat().st_mtime + 10
    os.utime(weights, (later, later))
    assert not export_onnx(tiny, dev_tsv=None, progress=False).skipped


def test_export_command(tiny: Path, dataset: Path, tmp_path: Path) -> None:
    env = {
        "EMOTION_STREAM_DATA__GOEMOTIONS_DIR": str(dataset),
        "EMOTION_STREAM_DATA__CACHE_DIR": str(tmp_path / "c"),
    }
    result = CliRunner().invoke(model_group, ["export", str(tiny), "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    assert "fp32" in result.output and "int8" in result.output and "parity file:" in result.output
    result = CliRunner().invoke(model_group, ["export", "--no-progress"], env=env)
    assert result.exit_code != 0 and "no built model found" in result.output
