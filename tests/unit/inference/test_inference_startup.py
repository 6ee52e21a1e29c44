"""start_engine: the selection cache, the stored parity reference, lazy imports and missing extras."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.errors import EngineError
from stream_app.inference import _optional, onnx_engine, startup
from stream_app.inference.onnx_engine import OnnxEngine
from stream_app.inference.onnx_export import quantize_int8_dynamic
from stream_app.inference.parity import REFERENCE_FILE, load_reference
from stream_app.inference.startup import PHASES, start_engine

pytestmark = pytest.mark.unit

_REPO = Path(__file__).resolve().parents[3]
Calls = list[tuple[str, str, str]]


def _start(model: Path, cache: Path, texts: tuple[str, ...], **kwargs: Any) -> startup.EngineStart:
    options: dict[str, Any] = {"engine": "onnx", "device": "cpu", "num_threads": 1, "cache_dir": cache}
    return start_engine(model, parity_texts=texts, **(options | kwargs))


def _run_python(code: str, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_restart_reuses_the_selection(tiny_model: Path, tmp_path: Path, texts: tuple[str, ...]) -> None:
    first = _start(tiny_model, tmp_path, texts)
    assert not first.cached and first.cache_file is not None and first.cache_file.is_file()
    assert tuple(first.phases) == PHASES and all(s >= 0 for s in first.phases.values())
    assert first.seconds == pytest.approx(sum(first.phases.values()))
    assert first.report.reference == "torch"
    stored = load_reference(
        [first.cache_file.parent / REFERENCE_FILE],
        texts,
        labels=first.engine.labels,
        max_length=128,
        model_version=first.engine.info.model_version,
    )
    assert stored is not None and stored.probs.shape == (len(texts), len(first.engine.labels))

    second = _start(tiny_model, tmp_path, texts)
    assert second.cached and second.cache_file == first.cache_file
    assert second.report.chosen == first.report.chosen and second.report.candidates == first.report.candidates
    assert second.parity is not None and second.parity.passed and second.parity.max_prob_diff < 1e-4
    batch = second.encoder(list(texts))
    np.testing.assert_allclose(second.engine.predict(batch), first.engine.predict(batch), atol=1e-6)


def test_what_changes_the_outcome_changes_the_key(
    tiny_model: Path, tmp_path: Path, texts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _start(tiny_model, tmp_path, texts)
    assert _start(tiny_model, tmp_path, texts).cached
    assert not _start(tiny_model, tmp_path, texts, max_prob_diff=0.2).cached, "another threshold"
    assert not _start(tiny_model, tmp_path, texts[:-1]).cached, "another parity sample"
    real = _optional.installed_version
    monkeypatch.setattr(startup, "installed_version", lambda name: "9.9.9" if name == "onnxruntime" else real(name))
    upgraded = _start(tiny_model, tmp_path, texts)
    assert not upgraded.cached and upgraded.cache_file != first.cache_file, "another onnxruntime"


def test_a_cached_choice_that_fails_the_gate_is_selected_again(
    tiny_model: Path, tmp_path: Path, texts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _start(tiny_model, tmp_path, texts)
    assert first.cache_file is not None

    class _Permuted(OnnxEngine):  # what a replaced ONNX file under the cache would look like
        def predict(self, batch: Any) -> Any:
            return np.roll(super().predict(batch), 1, axis=1)

    monkeypatch.setattr(onnx_engine, "OnnxEngine", _Permuted)
    calls: Calls = []
    again = _start(tiny_model, tmp_path, texts, on_fallback=lambda *a: calls.append(a))
    assert not again.cached, "the warm check failed, so the full selection ran"
    assert again.engine.info.name == "torch" and calls and calls[0][2].startswith("parity_failed")


def test_cached_fallbacks_are_reported_again(
    tiny_model: Path, onnx_cache: Path, tmp_path: Path, texts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    dynamic = quantize_int8_dynamic(
        onnx_engine.onnx_model_file(tiny_model, "fp32", onnx_cache), tmp_path / "dyn" / "model.int8.onnx"
    )

    class _DynamicInt8(OnnxEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, model_file=dynamic)

    monkeypatch.setattr(onnx_engine, "OnnxEngine", _DynamicInt8)
    for expect_cached in (False, True):
        calls: Calls = []
        started = _start(
            tiny_model,
            tmp_path / "cache",
            texts,
            engine="onnx-int8",
            min_top1_agreement=0.5,
            max_prob_diff=0.5,
            on_fallback=lambda *a, sink=calls: sink.append(a),
        )
        assert started.cached is expect_cached
        assert [(a, b) for a, b, _ in calls] == [("onnx-int8", "torch")]
        assert calls[0][2].startswith("nondeterministic: ")


def test_an_onnx_start_imports_neither_torch_nor_transformers(
    tiny_model: Path, tmp_path: Path, texts: tuple[str, ...]
) -> None:
    _start(tiny_model, tmp_path, texts)  # the cold start (with PyTorch as the reference) fills the cache
    result = _run_python(
        f"""
        import json, sys
        from pathlib import Path
        from stream_app.inference.startup import start_engine
        started = start_engine(
            {str(tiny_model)!r}, engine="onnx", device="cpu", num_threads=1,
            cache_dir=Path({str(tmp_path)!r}), parity_texts={list(texts)!r},
        )
        started.engine.predict(started.encoder(["hello there"]))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"cached": started.cached, "engine": started.engine.info.name, "heavy": heavy}}))
        """
    )
    assert result == {"cached": True, "engine": "onnx", "heavy": []}


_BLOCK_TORCH = """
import sys
for _name in ("torch", "transformers"):
    sys.modules[_name] = None  # as if not installed: importing it raises ImportError
"""


def test_without_torch_an_onnx_worker_still_starts_and_torch_is_a_clear_error(
    tiny_model: Path, onnx_cache: Path, tmp_path: Path, texts: tuple[str, ...]
) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    onnx = model / "onnx"
    onnx.mkdir()
    shutil.copy(onnx_engine.onnx_model_file(tiny_model, "fp32", onnx_cache), onnx / "model.onnx")
    result = _run_python(
        _BLOCK_TORCH
        + f"""
import json
from pathlib import Path
from stream_app.errors import EngineError
from stream_app.inference.startup import start_engine
kwargs = dict(device="cpu", num_threads=1, cache_dir=Path({str(tmp_path / "cache")!r}),
              parity_texts={list(texts)!r}, min_top1_agreement=0.5, max_prob_diff=0.5)
cold = start_engine({str(model)!r}, **kwargs)
warm = start_engine({str(model)!r}, **kwargs)
try:
    start_engine({str(model)!r}, **(kwargs | {{"engine": "torch"}}))
    torch_error = None
except EngineError as exc:
    torch_error = str(exc)
print(json.dumps({{
    "cold": [cold.cached, cold.engine.info.kind, cold.report.reference],
    "torch_candidate": [c.reason for c in cold.report.candidates if c.name == "torch"],
    "warm": [warm.cached, warm.engine.info.kind],
    "torch_error": torch_error,
}}))
"""
    )
    assert result["cold"] == [False, "onnx", "onnx (torch not installed)"]
    assert "emotion-stream[torch]" in result["torch_candidate"][0]
    assert result["warm"] == [True, "onnx"]
    assert result["torch_error"] is not None and "emotion-stream[torch]" in result["torch_error"]


def test_a_reference_shipped_with_the_model_spares_pytorch(
    tiny_model: Path, onnx_cache: Path, tmp_path: Path, texts: tuple[str, ...]
) -> None:
    """``model export`` writes onnx/reference.json; with it, a cold start needs no PyTorch at all."""
    first = _start(tiny_model, tmp_path / "scratch", texts)
    assert first.cache_file is not None
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "onnx").mkdir()
    shutil.copy(onnx_engine.onnx_model_file(tiny_model, "fp32", onnx_cache), model / "onnx" / "model.onnx")
    shutil.copy(first.cache_file.parent / REFERENCE_FILE, model / "onnx" / REFERENCE_FILE)
    result = _run_python(
        _BLOCK_TORCH
        + f"""
import json
from pathlib import Path
from stream_app.inference.startup import start_engine
cold = start_engine({str(model)!r}, engine="onnx", device="cpu", num_threads=1,
                    cache_dir=Path({str(tmp_path / "cache")!r}), parity_texts={list(texts)!r})
print(json.dumps([cold.cached, cold.engine.info.name, cold.report.reference]))
"""
    )
    assert result[:2] == [False, "onnx"] and str(result[2]).startswith("stored: torch-")


def test_a_missing_extra_names_it() -> None:
    with pytest.raises(EngineError, match=r"pip install 'emotion-stream\[torch\]'"):
        _optional.require("transformers.definitely_not_a_module", "a test")


def test_process_age_is_positive() -> None:
    age = startup.process_age_s()
    if sys.platform.startswith("linux"):
        assert age is not None and age > 0


def test_auto_device_on_a_host_without_a_gpu_does_not_import_torch() -> None:
    from stream_app.inference.select import _cuda_visible

    if _cuda_visible() is not False:
        pytest.skip("this host's driver shows an NVIDIA GPU (or it is not Linux)")
    result = _run_python(
        """
        import json, sys
        from stream_app.inference.select import resolve_device
        print(json.dumps([resolve_device("auto"), "torch" in sys.modules]))
        """
    )
    assert result == ["cpu", False]
