"""Score any Hugging Face sequence-classification checkpoint on a GoEmotions-format TSV.

Labels are matched by NAME: the TSV's ids are turned into names through ``labels.txt`` (beside the TSV
unless given), and the model's names come from its ``config.id2label``. So a checkpoint trained with
another label order (or with extra labels) is scored correctly; its logits for labels the data does not
have are ignored when taking the arg-max.

Metrics:

- ``top1_accuracy``: share of all rows whose top prediction is one of the gold labels (multi-label rows
  count as right if any of their labels is predicted).
- ``macro_f1_single`` and the per-class precision/recall/F1/support and the confusion matrix: over the rows
  that carry exactly one gold label (the usual single-label reading of GoEmotions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_app.errors import ModelError
from stream_app.model.data import Example, load_labels, load_split

if TYPE_CHECKING:
    import torch

__all__ = [
    "ClassMetrics",
    "EvalReport",
    "evaluate",
    "format_report",
    "label_mapping",
    "load_classifier",
    "predict_logits",
    "score_predictions",
]


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    """Precision, recall, F1 and support of one label over the single-label rows."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    """The result of :func:`evaluate`.

    ``confusion[gold][pred]`` counts the single-label rows, in ``labels`` order.
    """

    n: int
    n_single: int
    top1_accuracy: float
    macro_f1_single: float
    labels: tuple[str, ...]
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]
    model: str = ""
    tsv: str = ""
    max_length: int = 0
    seconds: float = 0.0
    ignored_model_labels: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists instead of tuples)."""
        out = asdict(self)
        out["labels"] = list(self.labels)
        out["per_class"] = [asdict(c) for c in self.per_class]
        out["confusion"] = [list(row) for row in self.confusion]
        out["ignored_model_labels"] = list(self.ignored_model_labels)
        return out


def load_classifier(model: Path | str) -> tuple[Any, Any, tuple[str, ...]]:
    """Load ``(model, tokenizer, label names in model order)`` from a folder or hub id, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ref = str(model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        clf = AutoModelForSequenceClassification.from_pretrained(ref)
        tok = AutoTokenizer.from_pretrained(ref)  # type: ignore[no-untyped-call]
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a sequence-classification model from {ref!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    clf.eval()
    id2label = getattr(clf.config, "id2label", None) or {}
    names = tuple(str(id2label[i]) for i in sorted(int(k) for k in id2label))
    if not names:
        raise ModelError(f"{ref}: config has no id2label")
    return clf, tok, names


def label_mapping(data_labels: Sequence[str], model_labels: Sequence[str], where: str = "") -> list[int]:
    """For each data label, the index of the same-named model label (case-insensitive).

    Raises:
        ModelError: a data label has no model label of the same name (e.g. the config only has the generic
            ``LABEL_0``..``LABEL_n`` names).
    """
    index = {name.strip().lower(): i for i, name in enumerate(model_labels)}
    missing = [name for name in data_labels if name.strip().lower() not in index]
    if missing:
        raise ModelError(
            f"{where or 'model'}: its labels {list(model_labels)} do not include {missing}; "
            "labels are matched by name, so the config's id2label must name them"
        )
    return [index[name.strip().lower()] for name in data_labels]


def predict_logits(
    predict: Callable[[dict[str, np.ndarray]], np.ndarray],
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    progress: bool,
    desc: str = "evaluate",
    input_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Run ``predict`` over ``texts`` in batches of similar length; return logits in input order.

    ``predict`` takes numpy int64 inputs (``input_ids``, ``attention_mask``, ...) and returns logits, so the
    same loop drives PyTorch and ONNX Runtime.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no texts to predict")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    names = list(input_names) if input_names is not None else [k for k in enc if k in tokenizer.model_input_names]
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    pad_id = tokenizer.pad_token_id or 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        width = int(lengths[idx].max())
        feed: dict[str, np.ndarray] = {}
        for name in names:
            fill = pad_id if name == "input_ids" else 0
            arr = np.full((len(idx), width), fill, dtype=np.int64)
            for row, i in enumerate(idx):
                seq = enc[name][i]
                arr[row, : len(seq)] = seq
            feed[name] = arr
        logits = np.asarray(predict(feed), dtype=np.float32)
        if out is None:
            out = np.zeros((len(texts), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    assert out is not None
    return out


def torch_predictor(model: Any, device: str = "cpu") -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Wrap a PyTorch classifier as a numpy-in, numpy-out ``predict`` for :func:`predict_logits`."""
    import torch

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        inputs: dict[str, torch.Tensor] = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
        with torch.inference_mode():
            logits = model(**inputs).logits
        result: np.ndarray = logits.float().cpu().numpy()
        return result

    return predict


def score_predictions(
    gold: Sequence[tuple[int, ...]], pred: np.ndarray, labels: Sequence[str]
) -> tuple[float, float, tuple[ClassMetrics, ...], tuple[tuple[int, ...], ...], int]:
    """``(top1_accuracy, macro_f1_single, per_class, confusion, n_single)`` for predicted label indices."""
    k = len(labels)
    n = len(gold)
    if n == 0:
        raise ValueError("no rows to score")
    hits = sum(int(p) in g for p, g in zip(pred, gold, strict=True))
    single = [i for i, g in enumerate(gold) if len(g) == 1]
    confusion = np.zeros((k, k), dtype=np.int64)
    for i in single:
        confusion[gold[i][0], int(pred[i])] += 1
    tp = np.diag(confusion).astype(np.float64)
    pred_count = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = np.divide(tp, pred_count, out=np.zeros(k), where=pred_count > 0)
    recall = np.divide(tp, support.astype(np.float64), out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    per_class = tuple(
        ClassMetrics(labels[j], float(precision[j]), float(recall[j]), float(f1[j]), int(support[j])) for j in range(k)
    )
    # Macro over the labels present in the gold single-label rows or predicted (sklearn's convention).
    present = (support > 0) | (pred_count > 0)
    macro = float(f1[present].mean()) if present.any() else 0.0
    return (
        hits / n,
        macro,
        per_class,
        tuple(tuple(int(x) for x in row) for row in confusion),
        len(single),
    )


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    model_labels: Sequence[str],
    examples: Sequence[Example],
    data_labels: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
    device: str = "cpu",
    model_name: str = "",
    tsv_name: str = "",
) -> EvalReport:
    """Score an already loaded model on parsed examples (used by the build, which holds the model)."""
    started = time.perf_counter()
    mapping = label_mapping(data_labels, model_labels, model_name)
    logits = predict_logits(
        torch_predictor(model, device),
        tokenizer,
        [e.text for e in examples],
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    pred = logits[:, mapping].argmax(axis=1)
    top1, macro, per_class, confusion, n_single = score_predictions([e.label_ids for e in examples], pred, data_labels)
    wanted = set(mapping)
    return EvalReport(
        n=len(examples),
        n_single=n_single,
        top1_accuracy=top1,
        macro_f1_single=macro,
        labels=tuple(data_labels),
        per_class=per_class,
        confusion=confusion,
        model=model_name,
        tsv=tsv_name,
        max_length=max_length,
        seconds=time.perf_counter() - started,
        ignored_model_labels=tuple(n for i, n in enumerate(model_labels) if i not in wanted),
    )


def evaluate(
    model_dir: Path | str,
    tsv: Path,
    *,
    labels: Path | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
    device: str = "cpu",
) -> EvalReport:
    """Score a sequence-classification folder or hub id on ``tsv``.

    Args:
        model_dir: a local folder in Hugging Face format or a hub id; its config must name its labels.
        tsv: a ``text<TAB>ids<TAB>comment id`` file.
        labels: the ``labels.txt`` giving the TSV's ids their names; default: beside ``tsv``.
        batch_size: rows per forward pass (batches group rows of similar length).
        max_length: token limit; longer texts are truncated, as the worker does.
        progress: show a tqdm bar.
        device: torch device.

    Raises:
        DataError: a bad row in the TSV or labels file.
        ModelError: the model cannot be loaded or its labels do not cover the data's.
    """
    tsv = Path(tsv)
    data_labels = load_labels(labels if labels is not None else tsv.parent / "labels.txt")
    examples = load_split(tsv, len(data_labels))
    model, tokenizer, model_labels = load_classifier(model_dir)
    model.to(device)
    return evaluate_examples(
        model,
        tokenizer,
        model_labels,
        examples,
        data_labels,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        device=device,
        model_name=str(model_dir),
        tsv_name=str(tsv),
    )


def format_report(report: EvalReport) -> str:
    """A plain-text table: headline metrics, then one line per class."""
    width = max(9, *(len(c.label) for c in report.per_class))
    lines: list[str] = []
    if report.model:
        lines.append(f"model: {report.model}")
    if report.tsv:
        lines.append(f"data:  {report.tsv}  ({report.n} rows, {report.n_single} single-label)")
    lines += [
        f"top-1 accuracy (any gold label): {report.top1_accuracy:.4f}",
        f"macro-F1 (single-label rows):    {report.macro_f1_single:.4f}",
        "",
        f"{'label':<{width}}  precision  recall      f1  support",
    ]
    lines.extend(
        f"{c.label:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:6.4f}  {c.support:7d}"
        for c in report.per_class
    )
    if report.ignored_model_labels:
        lines.append(f"(model labels not in the data, ignored: {', '.join(report.ignored_model_labels)})")
    return "\n".join(lines)
