from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stream_app.errors import DataError
from stream_app.model.commands import model as model_group
from stream_app.model.train import (
    Recipe,
    _length_grouped_batches,
    _remove_stale_temps,
    build_model,
    find_built_model,
    is_complete,
    resolve_default_model,
)

pytestmark = pytest.mark.unit

# 280 synthetic rows, 3 epochs of 9 steps: enough for the loss to fall, ~20 s on 2 cores.
SMALL = Recipe(max_train_rows=280, epochs=3)


def test_recipe_defaults_are_the_reference_recipe() -> None:
    r = Recipe()
    assert (r.epochs, r.lr, r.weight_decay, r.batch_size, r.warmup_ratio, r.max_length) == (
        1,
        1e-4,
        0.01,
        32,
        0.06,
        64,
    )
    assert (r.num_threads, r.seed, r.max_train_rows) == (2, 42, None)


def test_length_grouped_batches_cover_every_row_once() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=1000)
    recipe = Recipe(batch_size=32, length_group_chunk=4)
    batches = _length_grouped_batches(lengths, recipe, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)  # rows of similar length share a batch
    again = _length_grouped_batches(lengths, recipe, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded


def test_bad_training_row_is_reported_before_training(dataset: Path, tmp_path: Path) -> None:
    with (dataset / "train.tsv").open("a") as fh:
        fh.write("broken row without label columns\n")
    lines = (dataset / "train.tsv").read_text().count("\n")
    with pytest.raises(DataError, match=rf"train\.tsv:{lines}:"):
        build_model(dataset, tmp_path / "cache", SMALL, progress=False)
    assert not list((tmp_path / "cache" / "models").glob("*"))


def test_nothing_built_resolves_to_none(dataset: Path, tmp_path: Path) -> None:
    assert resolve_default_model(dataset, tmp_path / "cache") is None
    assert resolve_default_model(tmp_path / "no-data", tmp_path / "cache") is None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, dataset_writer: Callable[[Path], Path]) -> tuple[Path, Path, str]:
    """Build once through the CLI; returns (data dir, model folder, CLI output)."""
    root = tmp_path_factory.mktemp("build")
    data = dataset_writer(root / "data")
    env = {
        "EMOTION_STREAM_DATA__GOEMOTIONS_DIR": str(data),
        "EMOTION_STREAM_DATA__CACHE_DIR": str(root / "cache"),
    }
    args = [
        "build",
        "--max-train-rows",
        str(SMALL.max_train_rows),
        "--epochs",
        str(SMALL.epochs),
        "--no-progress",
    ]
    result = CliRunner().invoke(model_group, args, env=env)
    assert result.exit_code == 0, result.output
    folder = find_built_model(data, root / "cache", SMALL)
    assert folder is not None
    return data, folder, result.output


@pytest.mark.slow
def test_build_writes_a_complete_folder(built: tuple[Path, Path, str]) -> None:
    data, folder, output = built
    assert is_complete(folder)
    assert folder.name.startswith("emotion-minilm-")
    assert f"model folder: {folder}" in output and "build time:" in output
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate((data / "labels.txt").read_text().split())}
    card = json.loads((folder / "model_card.json").read_text())
    assert card["version"] == folder.name.removeprefix("emotion-minilm-")
    assert card["recipe"] == {**card["recipe"], "epochs": 3, "max_train_rows": 280, "lr": 1e-4}
    assert set(card["data"]) == {"train.tsv", "dev.tsv", "labels.txt"}
    assert set(card["dev"]["per_class"]["joy"]) == {"precision", "recall", "f1", "support"}
    assert card["build_seconds"] > 0 and "torch" in card["library_versions"]
    assert (folder / "confusion_dev.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mode = (folder / "config.json").stat().st_mode
    assert (folder / "model.safetensors").stat().st_mode == mode  # not left 0600 by the writer


@pytest.mark.slow
def test_loss_falls(built: tuple[Path, Path, str]) -> None:
    losses = json.loads((built[1] / "model_card.json").read_text())["training"]["losses"]
    assert len(losses) == 27
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2


@pytest.mark.slow
def test_learns_the_cues(built: tuple[Path, Path, str]) -> None:
    dev = json.loads((built[1] / "model_card.json").read_text())["dev"]
    assert dev["top1_accuracy"] > 0.5  # chance is about 1/7


@pytest.mark.slow
def test_second_build_is_a_no_op(built: tuple[Path, Path, str]) -> None:
    data, folder, _ = built
    cache = folder.parent.parent
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert build_model(data, cache, SMALL, progress=False) == folder
    assert time.perf_counter() - started < 2.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    env = {"EMOTION_STREAM_DATA__GOEMOTIONS_DIR": str(data), "EMOTION_STREAM_DATA__CACHE_DIR": str(cache)}
    args = ["build", "--max-train-rows", "280", "--epochs", "3", "--no-progress"]
    result = CliRunner().invoke(model_group, args, env=env)
    assert result.exit_code == 0 and "already built" in result.output
    # another recipe is another folder
    assert find_built_model(data, cache, replace(SMALL, lr=5e-5)) is None


@pytest.mark.slow
def test_reloads_offline(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    folder = built[1]
    script = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "out = m(**t(['I am so happy'], return_tensors='pt')).logits\n"
        "print(m.config.id2label[int(out.argmax())])\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty hub cache: nothing to fall back on
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in json.loads((folder / "config.json").read_text())["id2label"].values()
    assert not list((tmp_path / "hf-home").glob("**/*.safetensors"))


def test_stale_temp_folders_of_dead_builds_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "models" / "emotion-minilm-abc"
    final.parent.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = final.parent / f".tmp-{final.name}-{proc.stdout.strip()}-aaaaaa"
    alive = final.parent / f".tmp-{final.name}-{os.getpid()}-bbbbbb"
    other = final.parent / ".tmp-emotion-minilm-other-1-cccccc"
    for folder in (dead, alive, other):
        folder.mkdir()
    _remove_stale_temps(final)
    assert not dead.exists() and alive.exists() and other.exists()
