"""Export a classifier folder to ONNX (fp32) and an INT8 copy, and measure parity.

Writes into ``<model_dir>/onnx/``:

- ``model.onnx``: fp32, dynamic batch and sequence axes; inputs ``input_ids``, ``attention_mask`` (and
  ``token_type_ids`` when the model takes them), output ``logits``.
- ``model.int8.<scheme>.onnx``: :func:`~stream_app.inference.onnx_export.quantize_int8` (8-bit weights in
  blocks of 32, int8 activations quantised per row: batch-invariant). The scheme is in the name, so the
  engines never take a file of another recipe (the old dynamic ``model.int8.onnx``) for it.
- ``parity.json``: per variant, top-1 agreement with PyTorch and the largest absolute difference of the
  softmax probabilities on the parity texts (dev when given), the accuracy of each, how far a text's
  scores move between scored alone and in a padded batch, and file sizes.
- ``reference.json``: PyTorch fp32 probabilities of the packaged parity sample
  (:func:`~stream_app.inference.parity.default_parity_texts`, 128 tokens): the worker's parity gate checks
  its engine against them at start-up without importing PyTorch.

The export and quantisation themselves are :mod:`stream_app.inference.onnx_export`'s (the engines build the
same files on demand); this module adds the parity run and writes the three files together.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.errors import ModelError
from stream_app.inference._files import atomic_target
from stream_app.inference.base import model_identity, softmax
from stream_app.inference.onnx_engine import ONNX_FILES
from stream_app.inference.onnx_export import INT8_OPTIONS, export_fp32_detailed, quantize_int8
from stream_app.inference.parity import REFERENCE_FILE, ReferenceProbs, default_parity_texts, save_reference
from stream_app.model.data import load_labels, load_split
from stream_app.model.evaluate import label_mapping, load_classifier, predict_logits, torch_predictor

__all__ = ["ExportReport", "VariantParity", "export_onnx", "onnx_paths", "reference_path"]

PARITY_MAX_LENGTH = 128
_FALLBACK_TEXTS = (
    "I can't believe you did that, I'm furious!",
    "That is disgusting, who would eat it?",
    "I'm scared of what happens next.",
    "Thank you so much, this made my day!",
    "The meeting moved to 3pm.",
    "I miss her every single day.",
    "Wait, what? No way!",
    "ok",
    "Honestly this is the best thing I've read all week and I want to share it with everyone I know.",
    "Why would anyone think that was a good idea",
    "lol",
    "I'm not sure how I feel about the new update, some parts are nice but the rest is confusing.",
)


@dataclass(frozen=True, slots=True)
class VariantParity:
    """How one ONNX variant compares with PyTorch on the parity texts."""

    name: str
    path: str
    size_bytes: int
    top1_agreement: float
    max_abs_prob_diff: float
    accuracy: float | None
    batch_invariance: float | None = None


@dataclass(frozen=True)
class ExportReport:
    """The result of :func:`export_onnx` (also stored as ``parity.json``)."""

    model_dir: str
    parity_path: str
    n: int
    source: str
    exporter: str
    opset: int
    inputs: tuple[str, ...]
    torch_accuracy: float | None
    torch_size_bytes: int
    variants: tuple[VariantParity, ...]
    seconds: float
    skipped: bool = False

    def variant(self, name: str) -> VariantParity:
        """The variant called ``name`` (``fp32`` or ``int8``)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to ``parity.json`` (without ``skipped``)."""
        out = asdict(self)
        out.pop("skipped")
        out["inputs"] = list(self.inputs)
        out["variants"] = {v.name: {k: x for k, x in asdict(v).items() if k != "name"} for v in self.variants}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, skipped: bool = False) -> ExportReport:
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields.pop("versions", None)
        fields.pop("created_at", None)
        fields.pop("int8_options", None)
        fields["inputs"] = tuple(fields["inputs"])
        fields["variants"] = tuple(VariantParity(name=k, **v) for k, v in fields["variants"].items())
        return cls(**fields, skipped=skipped)


def onnx_paths(model_dir: Path) -> tuple[Path, Path, Path]:
    """``(model.onnx, model.int8.<scheme>.onnx, parity.json)`` under ``model_dir/onnx``."""
    folder = Path(model_dir) / "onnx"
    return folder / ONNX_FILES["fp32"], folder / ONNX_FILES["int8"], folder / "parity.json"


def reference_path(model_dir: Path) -> Path:
    """``model_dir/onnx/reference.json``: PyTorch probabilities of the packaged parity sample."""
    return Path(model_dir) / "onnx" / REFERENCE_FILE


def _weights_file(model_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise ModelError(f"{model_dir}: no model.safetensors (or pytorch_model.bin)")


def _up_to_date(model_dir: Path) -> bool:
    weights_mtime = _weights_file(model_dir).stat().st_mtime
    files = (*onnx_paths(model_dir), reference_path(model_dir))
    return all(p.is_file() and p.stat().st_mtime >= weights_mtime for p in files)


def _onnx_signature(path: Path) -> tuple[int, list[str]]:
    """The default-domain opset and the input names (in graph order) of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {t.name for t in proto.graph.initializer}
    return int(opset), [i.name for i in proto.graph.input if i.name not in initializers]


def _ort_predictor(path: Path, names: Sequence[str]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
    got = [i.name for i in session.get_inputs()]
    if sorted(got) != sorted(names):
        raise ModelError(f"{path}: inputs {got}, expected {list(names)}")

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        result: np.ndarray = session.run(["logits"], {n: feed[n] for n in names})[0]
        return result

    return predict


def export_onnx(
    model_dir: Path,
    *,
    dev_tsv: Path | None,
    force: bool = False,
    progress: bool = True,
    batch_size: int = 64,
) -> ExportReport:
    """Export ``model_dir`` to ONNX fp32 and INT8 and write ``parity.json`` and ``reference.json``.

    Skips the work (returning the stored report) when all four files exist and are newer than the
    weights, unless ``force``.

    Args:
        model_dir: a Hugging Face sequence-classification folder (safetensors).
        dev_tsv: texts (and gold labels, for accuracy) to compare on; None uses a small built-in set.
        force: export again even if up to date.
        progress: show tqdm bars.
        batch_size: rows per forward pass in the parity run.

    Raises:
        ModelError: the folder cannot be loaded, or onnxruntime cannot load an exported file.
        EngineError: the ONNX export or the INT8 quantisation failed.
        DataError: a bad row in ``dev_tsv``.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    fp32_path, int8_path, parity_path = onnx_paths(model_dir)
    if not force and _up_to_date(model_dir):
        return ExportReport.from_dict(json.loads(parity_path.read_text()), skipped=True)

    import onnx
    import onnxruntime
    import torch

    model, tokenizer, model_labels = load_classifier(model_dir)
    # Both models are built under temporary names and renamed into place only once parity has been measured.
    with atomic_target(fp32_path) as tmp_fp32, atomic_target(int8_path) as tmp_int8:
        exporter = export_fp32_detailed(model_dir, tmp_fp32).exporter
        quantize_int8(tmp_fp32, tmp_int8)
        opset, names = _onnx_signature(tmp_fp32)

        if dev_tsv is not None:
            data_labels = load_labels(Path(dev_tsv).parent / "labels.txt")
            examples = load_split(dev_tsv, len(data_labels))
            texts = [e.text for e in examples]
            gold = [e.label_ids for e in examples]
            mapping: list[int] | None = label_mapping(data_labels, model_labels, str(model_dir))
            source = str(dev_tsv)
        else:
            texts, gold, mapping, source = list(_FALLBACK_TEXTS), [], None, "built-in sample"

        def accuracy(logits: np.ndarray) -> float | None:
            if mapping is None:
                return None
            pred = logits[:, mapping].argmax(axis=1)
            return float(np.mean([int(p) in g for p, g in zip(pred, gold, strict=True)]))

        def run(predict: Callable[[dict[str, np.ndarray]], np.ndarray], desc: str) -> np.ndarray:
            return predict_logits(
                predict,
                tokenizer,
                texts,
                batch_size=batch_size,
                max_length=PARITY_MAX_LENGTH,
                progress=progress,
                desc=desc,
                input_names=names,
            )

        ref_logits = run(torch_predictor(model), "parity torch")
        ref_probs = softmax(ref_logits)
        ref_top = ref_logits.argmax(axis=1)
        sample = default_parity_texts()
        sample_probs = softmax(
            predict_logits(
                torch_predictor(model),
                tokenizer,
                sample,
                batch_size=batch_size,
                max_length=PARITY_MAX_LENGTH,
                progress=False,
                input_names=names,
            )
        )
        reference = ReferenceProbs(
            tuple(sample),
            sample_probs,
            tuple(model_labels),
            PARITY_MAX_LENGTH,
            model_identity(model_dir)[1],
            f"torch-{torch.__version__.split('+')[0]} fp32 cpu",
        )
        variants = []
        for name, tmp_path, final_path in (("fp32", tmp_fp32, fp32_path), ("int8", tmp_int8, int8_path)):
            logits = run(_ort_predictor(tmp_path, names), f"parity onnx {name}")
            variants.append(
                VariantParity(
                    name=name,
                    path=str(final_path.relative_to(model_dir)),
                    size_bytes=tmp_path.stat().st_size,
                    top1_agreement=float(np.mean(logits.argmax(axis=1) == ref_top)),
                    max_abs_prob_diff=float(np.abs(softmax(logits) - ref_probs).max()),
                    accuracy=accuracy(logits),
                    batch_invariance=_batch_invariance(model_dir, name, tmp_path, sample),
                )
            )
        report = ExportReport(
            model_dir=str(model_dir),
            parity_path=str(parity_path),
            n=len(texts),
            source=source,
            exporter=exporter,
            opset=opset,
            inputs=tuple(names),
            torch_accuracy=accuracy(ref_logits),
            torch_size_bytes=_weights_file(model_dir).stat().st_size,
            variants=tuple(variants),
            seconds=round(time.perf_counter() - started, 2),
        )
        document = report.to_dict() | {
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "int8_options": dict(INT8_OPTIONS),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    save_reference(reference_path(model_dir), reference)
    with atomic_target(parity_path) as tmp_parity:  # last, so a parity.json means both models are in place
        tmp_parity.write_text(json.dumps(document, indent=2) + "\n")
    return report


def _batch_invariance(model_dir: Path, precision: str, path: Path, texts: Sequence[str]) -> float:
    """Largest probability change of a parity text between scored alone and in a padded batch."""
    from stream_app.inference.onnx_engine import OnnxEngine
    from stream_app.inference.parity import batch_invariance
    from stream_app.inference.tokenize import TextEncoder

    engine = OnnxEngine(model_dir, "int8" if precision == "int8" else "fp32", "cpu", 1, model_file=path)
    try:
        encoder = TextEncoder.from_pretrained(model_dir, PARITY_MAX_LENGTH)
        return batch_invariance(engine, encoder, texts).max_prob_diff
    finally:
        engine.close()
