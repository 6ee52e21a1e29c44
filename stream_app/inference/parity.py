"""The parity gate: how a candidate engine's probabilities compare with PyTorch fp32, and where the
reference probabilities come from without running PyTorch at every start.

:func:`check_parity` is the gate itself. :class:`ReferenceProbs` are PyTorch fp32 probabilities for a fixed
text sample, stored as JSON (``reference.json``) in two places: ``<model>/onnx/`` (written by
``emotion-stream model export``, so an ONNX-only install without PyTorch can still check its engine) and
``<cache_dir>/engine-selection/<model version>/`` (written by the first start that had to compute them).
Rows are stored per text, so any subset of the sample can be checked against them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.inference._files import atomic_target
from stream_app.inference.base import Engine, FloatArray
from stream_app.inference.tokenize import TextEncoder, pad

__all__ = [
    "REFERENCE_FILE",
    "Invariance",
    "ParityResult",
    "ReferenceProbs",
    "batch_invariance",
    "check_parity",
    "default_parity_texts",
    "load_reference",
    "save_reference",
    "texts_digest",
]

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
_REFERENCE_SCHEMA = 1


def default_parity_texts() -> list[str]:
    """The fixed sample used for engine parity checks and warm-up (chat-like, all seven emotions)."""
    text = resources.files("stream_app").joinpath("resources/parity_texts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True, slots=True)
class ParityResult:
    """How a candidate's probabilities compare with the reference on the parity sample.

    Attributes:
        top1_agreement: share of rows whose top label matches the reference's (raw, reported).
        max_prob_diff: largest absolute probability difference over all rows and labels.
        passed: both gates hold (``decisive_agreement`` and ``max_prob_diff``).
        reason: what failed, or None.
        decisive_agreement: like ``top1_agreement``, but a flip between two labels that the reference
            itself scores within ``tie_margin`` of each other is not counted (the gated value).
        near_tie_flips: flips excused as near ties.
    """

    top1_agreement: float
    max_prob_diff: float
    passed: bool
    reason: str | None
    decisive_agreement: float = 1.0
    near_tie_flips: int = 0


def check_parity(
    candidate: FloatArray,
    reference: FloatArray,
    *,
    min_top1_agreement: float,
    max_prob_diff: float,
    tie_margin: float | None = None,
) -> ParityResult:
    """Compare two ``(rows, labels)`` probability arrays against the gate's two thresholds.

    The agreement gate counts a changed top label only where the reference preferred its label by more
    than ``tie_margin`` (default: ``max_prob_diff``) over the candidate's choice. A flip between two
    labels the reference scores nearly alike is what an accepted probability error of that size produces;
    counting it would make the gate a coin toss on small samples (INT8 MiniLM agrees on ~98% of dev
    texts, so 64 texts hold two or more near-tie flips about a third of the time), while every flip of a
    clear decision still counts. ``tie_margin=0`` gives the raw top-1 agreement.
    """
    if candidate.shape != reference.shape:
        return ParityResult(0.0, 1.0, False, f"shape {candidate.shape} != reference {reference.shape}", 0.0)
    if not np.isfinite(candidate).all():
        return ParityResult(0.0, 1.0, False, "non-finite probabilities", 0.0)
    rows = candidate.shape[0]
    if rows == 0:
        return ParityResult(1.0, 0.0, True, None)
    margin = max_prob_diff if tie_margin is None else tie_margin
    chosen = candidate.argmax(axis=1)
    expected = reference.argmax(axis=1)
    flips = chosen != expected
    index = np.arange(rows)
    # How much more the reference liked its own label than the candidate's choice.
    preference = reference[index, expected].astype(np.float64) - reference[index, chosen]
    decisive_flips = flips & (preference > margin)
    agreement = float(1.0 - flips.mean())
    decisive = float(1.0 - decisive_flips.mean())
    diff = float(np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).max())
    problems = []
    if decisive < min_top1_agreement:
        problems.append(
            f"top-1 agreement {decisive:.3f} < {min_top1_agreement:.3f} "
            f"({int(decisive_flips.sum())} of {rows} clear decisions changed)"
        )
    if diff > max_prob_diff:
        problems.append(f"max |dp| {diff:.4f} > {max_prob_diff:.4f}")
    return ParityResult(
        agreement,
        diff,
        not problems,
        "; ".join(problems) or None,
        decisive_agreement=decisive,
        near_tie_flips=int(flips.sum() - decisive_flips.sum()),
    )


def texts_digest(texts: Sequence[str]) -> str:
    """First 16 hex digits of a SHA-256 over the texts, in order (identifies a parity sample)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ReferenceProbs:
    """Reference probabilities for a text sample.

    Attributes:
        texts: the sample, in row order.
        probs: ``(len(texts), len(labels))`` float32 softmax probabilities.
        labels: label names in column order.
        max_length: the token limit the texts were encoded with.
        model_version: the model they belong to (:func:`~stream_app.inference.base.model_identity`).
        source: what computed them (``torch-2.15.0 fp32 cpu``).
    """

    texts: tuple[str, ...]
    probs: FloatArray
    labels: tuple[str, ...]
    max_length: int
    model_version: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to ``reference.json``."""
        return {
            "schema": _REFERENCE_SCHEMA,
            "model_version": self.model_version,
            "labels": list(self.labels),
            "max_length": self.max_length,
            "source": self.source,
            "rows": [
                {"text": text, "probs": [float(p) for p in row]}
                for text, row in zip(self.texts, self.probs.astype(np.float64), strict=True)
            ],
        }


def load_reference(
    files: Sequence[Path],
    texts: Sequence[str],
    *,
    labels: Sequence[str],
    max_length: int,
    model_version: str,
) -> ReferenceProbs | None:
    """Reference rows for ``texts`` from the first of ``files`` that has them all, else None.

    A file counts only when it belongs to the same model version, labels and token limit; an unreadable
    or foreign file is skipped (with a log line), never trusted.
    """
    for path in files:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("schema") != _REFERENCE_SCHEMA:
                continue
            if (
                data["model_version"] != model_version
                or list(data["labels"]) != list(labels)
                or int(data["max_length"]) != max_length
            ):
                log.info("parity reference %s is for another model, label set or token limit; ignored", path)
                continue
            rows = {str(row["text"]): row["probs"] for row in data["rows"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("parity reference %s is unreadable (%s); ignored", path, exc)
            continue
        if not all(text in rows for text in texts):
            continue
        probs = np.array([rows[text] for text in texts], dtype=np.float32).reshape(len(texts), len(labels))
        return ReferenceProbs(tuple(texts), probs, tuple(labels), max_length, model_version, str(data["source"]))
    return None


def save_reference(path: Path, reference: ReferenceProbs) -> Path:
    """Write ``reference`` to ``path`` atomically, keeping rows of other texts already stored there."""
    document = reference.to_dict()
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            same = (
                old.get("schema") == _REFERENCE_SCHEMA
                and old.get("model_version") == reference.model_version
                and old.get("labels") == list(reference.labels)
                and old.get("max_length") == reference.max_length
            )
            if same:
                mine = set(reference.texts)
                document["rows"] = [row for row in old["rows"] if row["text"] not in mine] + document["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("replacing unreadable parity reference %s (%s)", path, exc)
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(document) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True, slots=True)
class Invariance:
    """How much a text's scores move with the batch it shares (see :func:`batch_invariance`).

    Attributes:
        max_prob_diff: largest absolute probability difference between a text scored alone and in a batch.
        label_flips: texts whose top label differs between the two.
        rows: texts compared.
    """

    max_prob_diff: float
    label_flips: int
    rows: int

    def holds(self, tolerance: float) -> bool:
        """No label moved and no probability moved by more than ``tolerance``."""
        return self.label_flips == 0 and self.max_prob_diff <= tolerance


def batch_invariance(engine: Engine, encoder: TextEncoder, texts: Sequence[str], *, rows: int = 16) -> Invariance:
    """Score the first ``rows`` texts one by one, then all ``texts`` together in one batch (reversed, so
    each text has other companions and other neighbours) padded 16 tokens wider than needed, and compare.

    An engine whose scores depend on the batch (dynamic activation quantisation, a kernel chosen by
    batch shape) shows it here; an engine that computes every row on its own shows 0.
    """
    items = encoder.encode(list(texts))
    if not items:
        return Invariance(0.0, 0, 0)
    head = items[: max(1, rows)]
    alone = np.concatenate([engine.predict(encoder.pad([item])) for item in head])
    together = list(reversed(items))
    longest = max(item.n_tokens for item in together)
    width = min(longest + 16, max(longest, encoder.max_length))
    batch = pad(
        together, pad_id=encoder.pad_id, with_token_type_ids=encoder.with_token_type_ids, pad_to_multiple_of=width
    )
    mixed = engine.predict(batch)[::-1][: len(head)]
    diff = float(np.abs(mixed.astype(np.float64) - alone.astype(np.float64)).max())
    flips = int((mixed.argmax(axis=1) != alone.argmax(axis=1)).sum())
    return Invariance(diff, flips, len(head))
