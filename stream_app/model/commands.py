"""``emotion-stream model ...``: build, evaluate and export the emotion model.

The project CLI attaches this group with ``main.add_command(model)``; ``python -m
stream_app.model.commands`` runs it alone. Paths come from the settings (``EMOTION_STREAM_DATA__*``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import click

from stream_app.errors import EmotionStreamError
from stream_app.settings import load_settings

__all__ = ["model"]


@click.group(name="model")
def model() -> None:
    """Build, evaluate and export the emotion classifier."""


@model.command("build")
@click.option("--force", is_flag=True, help="Train again even if the folder for these inputs exists.")
@click.option("--max-train-rows", type=click.IntRange(min=1), default=None, help="Train on the first N rows only.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs (1).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def build(force: bool, max_train_rows: int | None, epochs: int | None, no_progress: bool) -> None:
    """Fine-tune MiniLM on GoEmotions (Ekman) train; score it on dev."""
    # Busy-waiting OpenMP threads collapse throughput (10x seen) when another process shares the cores;
    # only effective if torch has not started its thread pool yet, which is the case for this command.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from stream_app.model.train import Recipe, build_model, find_built_model

    settings = load_settings()
    recipe = Recipe()
    if max_train_rows is not None:
        recipe = replace(recipe, max_train_rows=max_train_rows)
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    try:
        existed = not force and find_built_model(settings.data.goemotions_dir, settings.data.cache_dir, recipe)
        folder = build_model(
            settings.data.goemotions_dir,
            settings.data.cache_dir,
            recipe,
            force=force,
            progress=not no_progress,
        )
    except EmotionStreamError as exc:
        raise click.ClickException(str(exc)) from exc
    card = json.loads((folder / "model_card.json").read_text())
    dev = card["dev"]
    click.echo(f"model folder: {folder}")
    click.echo(
        f"dev ({dev['n']} rows): top-1 accuracy {dev['top1_accuracy']:.4f}, "
        f"single-label macro-F1 {dev['macro_f1_single']:.4f}"
    )
    for label, m in dev["per_class"].items():
        click.echo(f"  {label:<9} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n {m['support']}")
    if existed:
        click.echo(f"already built, nothing to do (the build took {card['build_seconds']:.0f} s)")
    else:
        click.echo(f"build time: {card['build_seconds']:.0f} s")


def _report_path(model_ref: str, tsv: Path, cache_dir: Path) -> Path:
    folder = Path(model_ref)
    if folder.is_dir():
        return folder / "eval" / f"{tsv.stem}.json"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_ref).strip("-") or "model"
    return cache_dir / "evals" / safe / f"{tsv.stem}.json"


@model.command("evaluate")
@click.argument("model_dir_or_id")
@click.option(
    "--tsv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TSV to score (default: the settings' dev.tsv).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="labels.txt naming the TSV's ids (default: beside the TSV).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8, max=512), default=128, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def evaluate_cmd(
    model_dir_or_id: str,
    tsv: Path | None,
    labels: Path | None,
    batch_size: int,
    max_length: int,
    no_progress: bool,
) -> None:
    """Score MODEL_DIR_OR_ID (a folder or hub id whose config names its labels) on a TSV."""
    from stream_app.model.evaluate import evaluate, format_report

    settings = load_settings()
    tsv = tsv or settings.data.goemotions_dir / "dev.tsv"
    try:
        report = evaluate(
            model_dir_or_id,
            tsv,
            labels=labels,
            batch_size=batch_size,
            max_length=max_length,
            progress=not no_progress,
        )
    except EmotionStreamError as exc:
        raise click.ClickException(str(exc)) from exc
    out = _report_path(model_dir_or_id, tsv, settings.data.cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    click.echo(format_report(report))
    click.echo(f"report: {out}")


@model.command("export")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Export again even if the ONNX files are up to date.")
@click.option(
    "--tsv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Parity texts (default: the settings' dev.tsv).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def export_cmd(model_dir: Path | None, force: bool, tsv: Path | None, no_progress: bool) -> None:
    """Export MODEL_DIR (default: the built default model) to ONNX fp32 + INT8 and check parity."""
    from stream_app.model.export import export_onnx
    from stream_app.model.train import resolve_default_model

    settings = load_settings()
    if model_dir is None:
        model_dir = resolve_default_model(settings.data.goemotions_dir, settings.data.cache_dir)
        if model_dir is None:
            raise click.ClickException("no built model found; run `model build` first or pass MODEL_DIR")
    dev = tsv or settings.data.goemotions_dir / "dev.tsv"
    try:
        report = export_onnx(model_dir, dev_tsv=dev if dev.is_file() else None, force=force, progress=not no_progress)
    except EmotionStreamError as exc:
        raise click.ClickException(str(exc)) from exc
    state = "up to date, not exported again" if report.skipped else f"exported with {report.exporter}"
    click.echo(f"{model_dir / 'onnx'}: {state}")
    click.echo(f"parity on {report.n} texts ({report.source}):")
    acc = f"{report.torch_accuracy:.4f}" if report.torch_accuracy is not None else "-"
    click.echo(f"  {'torch':<6} accuracy {acc}  size {report.torch_size_bytes / 1e6:7.1f} MB")
    for v in report.variants:
        acc = f"{v.accuracy:.4f}" if v.accuracy is not None else "-"
        click.echo(
            f"  {v.name:<6} accuracy {acc}  size {v.size_bytes / 1e6:7.1f} MB  "
            f"top-1 agreement {v.top1_agreement:.4f}  max |dp| {v.max_abs_prob_diff:.4f}"
        )
    click.echo(f"parity file: {report.parity_path}")


if __name__ == "__main__":
    model()
