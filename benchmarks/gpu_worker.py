"""The worker's own host path end to end on a GPU, 1..N processes sharing one device; only Kafka is replaced.

Issue 11: with its GPU settings, how many messages per second does the worker drain per process and per
host, at what p99 batch time and GPU busy share (goal: >= 20,000 msg/s per host at p99 batch <= 20 ms)?
A lent GPU machine has no JVM and cannot receive Kafka, a JRE and the model within its transfer limit, so
each process here is the worker minus Faust and aiokafka, everything else the product's own code:

* settings from :func:`stream_app.settings.load_settings` (environment as for a GPU worker: the README's
  ``EMOTION_STREAM_MODEL__DEVICE=cuda`` and batching values, set here unless already in the environment;
  caches off, since every message is unique), each process's environment from the worker's own
  ``--processes`` supervisor (:func:`stream_app.worker.processes.child_env`), the interpreter set up as
  ``emotion-stream worker`` does (GIL switch interval, tokenizer pool size, gc thresholds, ``gc.freeze``);
* the engine from :func:`stream_app.service.build_runtime` (what the worker's model-load thread calls:
  ``start_engine`` with selection, parity gate and warm-up, and its selection cache);
* the core :class:`~stream_app.core.pipeline.Pipeline` from :func:`stream_app.assembly.build_pipeline`, the
  function the worker builds its own with (intake, classifier with the adaptive token budget, emitter,
  crash ledger, and the conversation stage, on by default, over a dict standing in for its RocksDB table);
* a sink that acknowledges every sent batch at once (standing in for the Kafka producer), and a feed loop
  standing in for the consumer: pre-encoded ``chat_message.v1`` records (unique ids and texts, 64
  conversations keyed as producers key them) in fetched chunks over ``--partitions`` partitions (at most
  ``--per-partition`` records per partition and ``kafka.max_poll_records`` per chunk, as the worker
  configures its consumer), awaiting :meth:`Pipeline.feed` (its backpressure), and committing
  :meth:`Pipeline.committable` offsets on the worker's commit interval.

Per process: messages/s between 5% and 95% of its outputs; batch time (``stage_ms.infer``), size and
token budget from the ``stage_metrics.v1`` records the emitter publishes (batches acknowledged within that
window: p50, p99, mean size); the event loop's CPU per message (main thread, /proc) and the process's.
Per host (N processes started together after every engine is loaded, released by one start signal):
all outputs between the first 5% and the last 95% of the host's outputs over that wall time, GPU busy
share (NVML utilisation every 100 ms within that window: mean, p50) and peak device memory.

Each section (one N) goes to the JSON as soon as it finishes: ``$OUT/worker-gpu.json`` when ``OUT`` is set,
else ``benchmarks/results/worker-gpu.json``; a table is printed at the end. ``--cpu-smoke`` runs the same
code on the CPU (PyTorch engine) with 300 messages and 1, 2 processes. ``--check-imports`` prints which
third-party distributions the processes imported and where each comes from on the device (the device's
own packages, or a wheel in ``--wheels``); the JSON has it always.

Device run, from the repository root, with ``.gpu/`` (built by ``benchmarks/gpu_carry.sh``: the model as fp16,
the dev split, and wheels of what the device lacks; carried as an ignored path)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_worker.py --model .gpu/model --texts .gpu/dev.tsv --check-imports

On this 2-core machine: ``.venv/bin/python benchmarks/gpu_worker.py --cpu-smoke --check-imports`` (about 20 s).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
TOPIC = "chat.messages.v1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The README's settings for a GPU worker (docs/performance.md, "GPU"), with caches off: every message here is
# unique, so a cache could only cost. Anything already in the environment wins.
GPU_ENV = {
    "EMOTION_STREAM_MODEL__DEVICE": "cuda",
    "EMOTION_STREAM_MODEL__ENGINE": "auto",
    "EMOTION_STREAM_MODEL__GPU_DTYPE": "float16",
    "EMOTION_STREAM_BATCHING__MAX_BATCH_SIZE": "2048",
    "EMOTION_STREAM_BATCHING__MAX_BATCH_TOKENS": "16384",
    "EMOTION_STREAM_BATCHING__MAX_BATCH_TOKENS_CEILING": "65536",
    "EMOTION_STREAM_BATCHING__MIN_BATCH_TOKENS": "4096",
    "EMOTION_STREAM_BATCHING__TARGET_BATCH_P99_MS": "20",
    "EMOTION_STREAM_CACHE__L1_ENABLED": "false",
    "EMOTION_STREAM_CACHE__L2_ENABLED": "false",
}
# --cpu-smoke: on the CPU with the PyTorch engine (a model folder without onnx/ would make engine=auto export
# ONNX first, minutes on 2 cores), batches of at most 64 so that a few hundred messages make several batches
CPU_ENV = {
    **GPU_ENV,
    "EMOTION_STREAM_MODEL__DEVICE": "cpu",
    "EMOTION_STREAM_MODEL__ENGINE": "torch",
    "EMOTION_STREAM_BATCHING__MAX_BATCH_SIZE": "64",
}
# messages per process by process count (each section well under a minute on an H100/H200)
DEFAULT_MESSAGES = {1: 100_000, 2: 60_000, 4: 40_000, 8: 25_000}

# What the lent machine has (the device list of issue 11) and what those pull in; anything else imported
# must come as a wheel in .gpu/whl.
DEVICE_LISTED = {
    "torch", "transformers", "tokenizers", "onnxruntime", "prometheus_client", "psutil", "uvloop",
    "nvidia_ml_py", "numpy", "pyyaml",
}  # fmt: skip
DEVICE_DEPENDENCIES = {
    "typing_extensions", "filelock", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
    "packaging", "regex", "tqdm", "safetensors", "huggingface_hub", "triton", "setuptools", "hf_xet",
    "flatbuffers", "protobuf", "coloredlogs", "humanfriendly",
}  # fmt: skip
# Imported by transformers 4.57 only when installed (is_sklearn_available() and the like), and what they pull
# in: absent on the device, so not needed there.
OPTIONAL = {
    "scikit_learn", "scipy", "joblib", "threadpoolctl", "narwhals", "cloudpickle", "rich", "pygments",
    "markdown_it_py", "mdurl", "pillow", "opentelemetry_api", "opentelemetry_sdk", "opentelemetry_proto",
    "opentelemetry_semantic_conventions", "opentelemetry_exporter_otlp_proto_http",
    "opentelemetry_exporter_otlp_proto_common", "opentelemetry_exporter_otlp_common",
    "opentelemetry_exporter_http_transport", "googleapis_common_protos", "importlib_metadata", "zipp",
    "sentence_transformers", "accelerate", "onnx", "onnxscript", "onnx_ir", "ml_dtypes",
}  # fmt: skip


def _norm(dist: str) -> str:
    return dist.lower().replace("-", "_").replace(".", "_")


# ---------------------------------------------------------------------------------------------- child side
@dataclass(frozen=True, slots=True)
class Rec:
    """A fetched record: what aiokafka's ConsumerRecord offers the core."""

    offset: int
    value: bytes
    key: bytes
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()


class AckingSink:
    """The emitter's sink: every sent batch is acknowledged at once (standing in for the Kafka producer).

    Records when outputs (events and dead letters) leave, and keeps the ``stage_metrics.v1`` records.
    """

    def __init__(self, events_topic: str, dead_letters_topic: str, metrics_topic: str) -> None:
        self.outputs_topics = {events_topic, dead_letters_topic}
        self.dead_letters_topic = dead_letters_topic
        self.metrics_topic = metrics_topic
        self.outputs = 0
        self.dead_letters = 0
        self.sends: list[tuple[float, int]] = []  # (monotonic time, outputs so far)
        self.stage_metrics: list[tuple[float, bytes]] = []
        self.other: dict[str, int] = {}

    async def send(self, topic: str, records: Sequence[Any]) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        now = time.monotonic()
        if topic in self.outputs_topics:
            self.outputs += len(records)
            if topic == self.dead_letters_topic:
                self.dead_letters += len(records)
            self.sends.append((now, self.outputs))
        elif topic == self.metrics_topic:
            self.stage_metrics.extend((now, r.value) for r in records)
        else:
            self.other[topic] = self.other.get(topic, 0) + len(records)
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return [(list(range(len(records))), fut)]


def read_texts(path: Path) -> list[str]:
    """The distinct texts of a GoEmotions TSV (text<TAB>label ids<TAB>id), read by the library."""
    from stream_app.model.data import load_labels, load_split

    names = path.parent / "labels.txt"
    n_labels = len(load_labels(names)) if names.is_file() else 7
    return list(dict.fromkeys(e.text for e in load_split(path, n_labels)))


def make_chunks(
    texts: Sequence[str], n: int, *, tag: str, partitions: int, conversations: int, per_partition: int, max_poll: int
) -> list[dict[int, list[Rec]]]:
    """``n`` chat_message.v1 records as fetched chunks, in order, like a consumer's ``getmany``.

    Unique ids; texts repeat the file with ``" #k"`` on the k-th repeat, so no two are equal (the classifier
    de-duplicates equal texts in a chunk; the caches are off anyway). Conversation ``c-j`` (j < conversations)
    is keyed by its id and lives in partition ``j % partitions``; ``sent_at`` advances 1 ms per message.
    """
    from stream_app.records import rfc3339

    base = time.time() - n / 1000.0
    queues: list[list[Rec]] = [[] for _ in range(partitions)]
    for i in range(n):
        text = texts[i % len(texts)]
        rep = i // len(texts)
        if rep:
            text = f"{text} #{rep}"
        j = i % conversations
        conv = f"c-{j}"
        sent = base + i / 1000.0
        doc = {
            "message_id": f"{tag}-m-{i}",
            "conversation_id": conv,
            "user_id": f"u-{i % 101}",
            "text": text,
            "sent_at": rfc3339(sent),
        }
        p = j % partitions
        queues[p].append(Rec(len(queues[p]), orjson.dumps(doc), conv.encode(), int(sent * 1000)))
    chunks: list[dict[int, list[Rec]]] = []
    positions = [0] * partitions
    share = max(1, min(per_partition, max_poll // partitions))
    while any(positions[p] < len(queues[p]) for p in range(partitions)):
        chunk: dict[int, list[Rec]] = {}
        for p in range(partitions):
            got = queues[p][positions[p] : positions[p] + share]
            if got:
                chunk[p] = got
                positions[p] += len(got)
        chunks.append(chunk)
    return chunks


def _ticks() -> tuple[int, int]:
    """(main thread, whole process) CPU ticks (user + system) of this process."""

    def ticks(path: str) -> int:
        with open(path, "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    pid = os.getpid()
    return ticks(f"/proc/{pid}/task/{pid}/stat"), ticks(f"/proc/{pid}/stat")


class CpuSampler:
    """(monotonic time, main-thread ticks, process ticks) every ``interval_s`` on a daemon thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), *_ticks()))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.samples.append((time.monotonic(), *_ticks()))


def _at(samples: Sequence[tuple[float, int, int]], t: float) -> tuple[float, float]:
    """Ticks (main thread, process) at time ``t``, linear between the samples around it."""
    prev = samples[0]
    for s in samples:
        if s[0] >= t:
            if s[0] == prev[0]:
                return float(s[1]), float(s[2])
            f = (t - prev[0]) / (s[0] - prev[0])
            return prev[1] + f * (s[1] - prev[1]), prev[2] + f * (s[2] - prev[2])
        prev = s
    return float(prev[1]), float(prev[2])


def window(
    sends: Sequence[tuple[float, int]], total: int, lo: float = 0.05, hi: float = 0.95
) -> tuple[float, float, int]:
    """(start, end, outputs) between the sends reaching ``lo`` and ``hi`` of ``total`` outputs."""
    first = next(s for s in sends if s[1] >= lo * total)
    last = next(s for s in sends if s[1] >= hi * total)
    return first[0], last[0], last[1] - first[1]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def batch_summary(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50/p99 batch (inference) time, sizes and budgets of ``stage_metrics.v1`` records."""
    if not docs:
        return {"batches": 0}
    infer = [float(d["stage_ms"]["infer"]) for d in docs]
    sizes = [int(d["size"]) for d in docs]
    reasons: dict[str, int] = {}
    for d in docs:
        reasons[d["closed_reason"]] = reasons.get(d["closed_reason"], 0) + 1
    return {
        "batches": len(docs),
        "infer_ms_p50": percentile(infer, 50),
        "infer_ms_p99": percentile(infer, 99),
        "infer_ms_max": max(infer),
        "mean_batch_size": statistics.fmean(sizes),
        "max_batch_size": max(sizes),
        "padded_tokens_mean": statistics.fmean(int(d["padded_tokens"]) for d in docs),
        "token_budget_last": int(docs[-1]["token_budget"]),
        "token_budget_max": max(int(d["token_budget"]) for d in docs),
        "tokenize_ms_p50": percentile([float(d["stage_ms"]["tokenize"]) for d in docs], 50),
        "queue_wait_ms_p50": percentile([float(d["stage_ms"]["queue_wait"]) for d in docs], 50),
        "queue_wait_ms_p99": percentile([float(d["stage_ms"]["queue_wait"]) for d in docs], 99),
        "closed_reasons": reasons,
    }


def imported_distributions() -> list[str]:
    """Third-party distributions (normalised names) providing the modules imported in this process."""
    mapping = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    found: set[str] = set()
    for name in list(sys.modules):
        top = name.split(".", 1)[0]
        if not top or top.startswith("_") or top in stdlib or top == "stream_app":
            continue
        for dist in mapping.get(top, []):
            found.add(_norm(dist))
    return sorted(found)


async def _every(interval_s: float, tick: Any) -> None:
    while True:
        await asyncio.sleep(interval_s)
        tick()


async def drive(
    pipeline: Any, settings: Any, chunks: Sequence[Mapping[int, Sequence[Rec]]], partitions: int, deadline: float
) -> dict[str, Any]:
    """Feed every chunk as the worker's consumer callback does, then wait for the last acknowledgements."""
    await pipeline.start()
    gc.collect()
    gc.freeze()  # as the worker does once ready
    pipeline.assigned(dict.fromkeys(range(partitions)))

    def commit() -> None:  # the worker's commit tick, without a broker
        offsets = pipeline.committable()
        if offsets:
            pipeline.mark_committed(offsets)

    timers = [asyncio.create_task(_every(settings.kafka.commit_interval_s, commit))]
    stages = pipeline.emitter.stages
    if stages:
        stage = stages[0]

        def sweep() -> None:
            if stage.sweep():
                pipeline.emitter.request_flush()

        timers.append(asyncio.create_task(_every(settings.conversations.sweep_interval_s, sweep)))
    fed = 0
    cut = False
    try:
        for chunk in chunks:
            if pipeline.failed is not None or time.monotonic() > deadline:
                cut = True
                break
            await pipeline.feed(TOPIC, chunk)
            fed += sum(len(r) for r in chunk.values())
            await asyncio.sleep(0)  # a consumer's getmany yields to the loop between fetches
        drained = await pipeline.drain(max(1.0, deadline - time.monotonic()))
        commit()
    finally:
        for t in timers:
            t.cancel()
        await pipeline.stop()
    return {
        "fed": fed,
        "cut_by_time_limit": cut,
        "drained": drained,
        "failed": repr(pipeline.failed) if pipeline.failed else None,
    }


def run_child(index: int, section_dir: Path, texts_path: Path, messages: int, opts: Mapping[str, Any]) -> None:
    """One worker process of a section: load, report ready, wait for the start signal, drain, report."""
    started = time.monotonic()
    out: dict[str, Any] = {"index": index, "pid": os.getpid()}
    result_file = section_dir / f"child-{index}.json"
    try:
        # what `emotion-stream worker` and run_worker do before anything loads
        gc.set_threshold(50_000, 50, 100)
        from stream_app.settings import load_settings

        settings = load_settings()
        sys.setswitchinterval(settings.worker.gil_switch_interval_ms / 1000.0)
        os.environ.setdefault("RAYON_NUM_THREADS", str(settings.worker.resolved_tokenizer_threads()))
        if not settings.model.cpu_spin_wait:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from stream_app.metrics import Metrics
        from stream_app.sampler import ResourceSampler
        from stream_app.service import build_runtime

        settings.worker.state_dir.mkdir(parents=True, exist_ok=True)
        metrics = Metrics()
        t0 = time.monotonic()
        rt = build_runtime(settings, metrics)
        info = rt.engine.info
        start = rt.engine_start
        out["engine"] = {
            "name": f"{info.kind}-{info.precision}",
            "runtime": info.runtime,
            "device": info.device,
            "model": f"{info.model_name} {info.model_version}",
            "start_s": round(time.monotonic() - t0, 3),
            "phases_s": {k: round(v, 3) for k, v in start.phases.items()} if start is not None else {},
            "cached_selection": start.cached if start is not None else None,
            "selection": rt.selection.as_dict() if rt.selection is not None else None,
            "concurrent_batches": rt.concurrent_batches,
            "inference_threads": rt.inference_threads,
            "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
        }
        sink = AckingSink(settings.topics.events, settings.topics.dead_letters, settings.topics.metrics)
        from stream_app.assembly import build_pipeline
        from stream_app.devtools.stores import MemoryStateStore

        store = MemoryStateStore(f"{settings.worker.app_id}-emotion-conversations-v1-changelog")
        pipeline = build_pipeline(
            settings,
            rt,
            sink=sink,
            metrics=metrics,
            on_fatal=lambda exc: None,  # pipeline.failed stops the feed loop
            conversation_store=store,
        ).pipeline
        out["settings"] = {
            "batching": settings.batching.model_dump(mode="json"),
            "conversations": settings.conversations.enabled,
            "l1": settings.cache.l1_enabled,
            "l2": settings.cache.l2_enabled,
            "max_poll_records": settings.kafka.max_poll_records,
            "worker_id": settings.worker.worker_id,
        }
        max_poll = min(settings.kafka.max_poll_records, settings.batching.queue_capacity)  # as the worker's consumer
        chunks = make_chunks(
            read_texts(texts_path),
            messages,
            tag=f"p{index}",
            partitions=opts["partitions"],
            conversations=opts["conversations"],
            per_partition=opts["per_partition"],
            max_poll=max_poll,
        )
        out["chunks"] = len(chunks)
        out["ready_after_s"] = round(time.monotonic() - started, 3)
        (section_dir / f"ready-{index}").write_text("1")
        go = section_dir / "go"
        wait_until = time.monotonic() + opts["time_limit_s"]
        while not go.exists():
            if time.monotonic() > wait_until:
                raise TimeoutError("no start signal")
            time.sleep(0.002)
        deadline = float(go.read_text() or 0) or (time.monotonic() + opts["time_limit_s"])
        sampler = CpuSampler()
        sampler.start()
        # the worker's resource gauges (CPU, memory, GPU through pynvml), sampled as run_worker does
        resources = ResourceSampler(metrics, settings.metrics.profile_sample_interval_s).start()
        t_go = time.monotonic()
        out["run"] = asyncio.run(drive(pipeline, settings, chunks, opts["partitions"], deadline))
        resources.stop()
        sampler.stop()
        out["run"]["wall_s"] = round(time.monotonic() - t_go, 3)
        total = sink.outputs
        out["outputs"] = total
        out["dead_letters"] = sink.dead_letters
        out["other_topics"] = sink.other
        out["sends"] = [[round(t, 6), n] for t, n in sink.sends]
        docs = [(t, orjson.loads(v)) for t, v in sink.stage_metrics]
        out["batches_all"] = batch_summary([d for _, d in docs])
        if total >= 20:
            t5, t95, n = window(sink.sends, total)
            if n > 0 and t95 > t5:
                loop5, proc5 = _at(sampler.samples, t5)
                loop95, proc95 = _at(sampler.samples, t95)
                tick_us = 1e6 / CLK_TCK
                out["window"] = {"start": t5, "end": t95, "messages": n, "seconds": round(t95 - t5, 4)}
                out["msgs_per_s"] = n / (t95 - t5)
                out["loop_cpu_us_per_msg"] = (loop95 - loop5) * tick_us / n
                out["process_cpu_us_per_msg"] = (proc95 - proc5) * tick_us / n
                out["batches"] = batch_summary([d for t, d in docs if t5 <= t <= t95])
        if info.device.startswith("cuda"):
            import torch

            out["torch_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["imported_distributions"] = imported_distributions()
        names = ("torch", "transformers", "tokenizers", "huggingface_hub", "pydantic")
        out["versions"] = {d: importlib.metadata.version(d) for d in names if _installed(d)}
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent in the result file
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-4000:]
    result_file.write_text(json.dumps(out))


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------------------------- parent side
class GpuSampler:
    """NVML utilisation and memory of GPU 0 every ``interval_s`` on a daemon thread (nothing without pynvml)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, util %, used MiB)
        self.note = ""
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 -- no pynvml or no GPU: sampling off, said in the note
            self.note = f"GPU sampling off: {exc!r}"

    def start(self) -> None:
        if self._nvml is None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
                used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
                self.samples.append((time.monotonic(), util, used))
            except Exception as exc:  # noqa: BLE001 -- one failed reading ends sampling, said in the note
                self.note = f"GPU sampling stopped: {exc!r}"
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)


def _device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            facts["nvidia_smi_L"] = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            facts["nvidia_smi_L"] = repr(exc)
    return facts


def import_check(dists: Iterable[str], wheels: Path) -> dict[str, str]:
    """Where each imported distribution comes from on the device: a carried wheel, the device, or MISSING."""
    carried = {_norm(p.name.split("-", 1)[0]) for p in wheels.glob("*.whl")} if wheels.is_dir() else set()
    out: dict[str, str] = {}
    for d in sorted(set(dists)):
        if d in carried:
            out[d] = "wheel"
        elif d in DEVICE_LISTED:
            out[d] = "device (listed)"
        elif d in DEVICE_DEPENDENCIES or d.startswith(("nvidia_", "cuda_")):
            out[d] = "device (dependency of torch / transformers)"
        elif d in OPTIONAL:
            out[d] = "optional (imported by transformers only when installed)"
        else:
            out[d] = "MISSING"
    return out


def run_section(
    n: int, messages: int, args: Mapping[str, Any], env: Mapping[str, str], workdir: Path
) -> dict[str, Any]:
    """Start ``n`` worker processes, release them together once all are loaded, and aggregate."""
    from stream_app.settings import load_settings
    from stream_app.worker.processes import child_env

    section_dir = workdir / f"n{n}"
    section_dir.mkdir(parents=True)
    settings = load_settings()
    limit = float(args["time_limit_s"])
    t_start = time.monotonic()
    children: list[subprocess.Popen[bytes]] = []
    logs = []
    for i in range(n):
        cenv = child_env(settings, i, env)  # the worker's --processes supervisor: own worker id, state folder
        log = open(section_dir / f"child-{i}.log", "wb")  # noqa: SIM115 -- closed below
        logs.append(log)
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", str(i), "--section-dir", str(section_dir),
            "--texts", str(args["texts"]), "--messages", str(messages), "--partitions", str(args["partitions"]),
            "--per-partition", str(args["per_partition"]), "--conversations", str(args["conversations"]),
            "--time-limit-s", str(limit),
        ]  # fmt: skip
        children.append(subprocess.Popen(cmd, env=cenv, stdout=log, stderr=subprocess.STDOUT))
    section: dict[str, Any] = {"processes": n, "messages_per_process": messages}
    gpu = GpuSampler()
    try:
        # wait until every process is loaded (or one failed), bounded by the section's limit
        while time.monotonic() - t_start < limit:
            ready = sum((section_dir / f"ready-{i}").exists() for i in range(n))
            dead = [c for c in children if c.poll() is not None]
            if ready == n or dead:
                break
            time.sleep(0.02)
        section["load_s"] = round(time.monotonic() - t_start, 2)
        deadline = t_start + limit
        gpu.start()
        (section_dir / "go").write_text(repr(deadline))
        for c in children:
            try:
                c.wait(timeout=max(1.0, deadline + 10 - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)
    finally:
        gpu.stop()
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait(5)
        for log in logs:
            log.close()
    section["wall_s"] = round(time.monotonic() - t_start, 2)
    results = []
    for i in range(n):
        f = section_dir / f"child-{i}.json"
        if f.exists():
            results.append(json.loads(f.read_text()))
        else:
            tail = (section_dir / f"child-{i}.log").read_bytes()[-3000:].decode(errors="replace")
            results.append({"index": i, "error": f"no result (exit {children[i].returncode})", "log_tail": tail})
    errors = [r for r in results if "error" in r]
    for r in errors:
        log_file = section_dir / f"child-{r['index']}.log"
        if "log_tail" not in r and log_file.exists():
            r["log_tail"] = log_file.read_bytes()[-3000:].decode(errors="replace")
    section["errors"] = [{k: r.get(k) for k in ("index", "error", "traceback", "log_tail")} for r in errors]
    # per host: every process's outputs, between the first 5% and the last 95% of the host's total
    events = sorted((t, n_) for r in results for t, n_ in _increments(r.get("sends", [])))
    total = sum(n_ for _, n_ in events)
    section["outputs"] = total
    host: dict[str, Any] = {"outputs": total}
    if total >= 20:
        cum = 0
        cums = []
        for t, n_ in events:
            cum += n_
            cums.append((t, cum))
        t5, t95, msgs = window(cums, total)
        if t95 > t5:
            host.update(msgs_per_s=msgs / (t95 - t5), window_s=round(t95 - t5, 3), window_messages=msgs)
            in_window = [s for s in gpu.samples if t5 <= s[0] <= t95]
            utils = [s[1] for s in in_window]
            host["gpu_busy_mean_pct"] = statistics.fmean(utils) if utils else None
            host["gpu_busy_p50_pct"] = percentile(utils, 50)
            host["gpu_samples_in_window"] = len(utils)
    host["gpu_memory_peak_mib"] = max((s[2] for s in gpu.samples), default=None)
    host["gpu_note"] = gpu.note
    ok = [r for r in results if "msgs_per_s" in r]
    if ok:
        host["sum_process_msgs_per_s"] = sum(r["msgs_per_s"] for r in ok)
        all_p99 = [r["batches"].get("infer_ms_p99") for r in ok if r.get("batches", {}).get("batches")]
        host["worst_process_p99_batch_ms"] = max((p for p in all_p99 if p is not None), default=None)
    section["host"] = host
    section["per_process"] = [
        {k: r.get(k) for k in (
            "index", "msgs_per_s", "loop_cpu_us_per_msg", "process_cpu_us_per_msg", "window", "batches",
            "batches_all", "outputs", "dead_letters", "other_topics", "engine", "ready_after_s", "run",
            "torch_peak_allocated_mb", "chunks",
        )}
        for r in results
    ]  # fmt: skip
    first = next((r for r in results if "settings" in r), None)
    if first is not None:
        section["settings"] = first["settings"]
        section["versions"] = first.get("versions")
    section["imported_distributions"] = sorted({d for r in results for d in r.get("imported_distributions", [])})
    return section


def _increments(sends: Sequence[Sequence[float]]) -> list[tuple[float, int]]:
    out = []
    prev = 0
    for t, n in sends:
        out.append((float(t), int(n) - prev))
        prev = int(n)
    return out


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = (
    ("N", 2), ("host msg/s", 10), ("sum proc msg/s", 14), ("per proc msg/s", 15), ("p50/p99 batch ms", 16),
    ("mean batch", 10), ("budget", 7), ("loop µs/msg", 11), ("proc µs/msg", 11), ("GPU busy", 8), ("GPU MiB", 7),
)  # fmt: skip


def table_row(s: Mapping[str, Any]) -> list[str]:
    """One section's cells: host and per-process rates, batch times (worst p99 of the processes), CPU, GPU."""
    host = s.get("host", {})
    procs = [p for p in s.get("per_process", []) if p.get("msgs_per_s")]
    rates = [p["msgs_per_s"] for p in procs]
    # batches acknowledged within each process's window; all of its batches when none was (a short run: a
    # batch's stage_metrics record leaves once all its rows are acknowledged, in each partition's order)
    batches = [p["batches"] if p.get("batches", {}).get("batches") else p["batches_all"] for p in procs]
    batches = [b for b in batches if b and b.get("batches")]
    p50 = statistics.median(b["infer_ms_p50"] for b in batches) if batches else None
    p99 = max(b["infer_ms_p99"] for b in batches) if batches else None
    busy = host.get("gpu_busy_mean_pct")
    return [
        str(s["processes"]),
        _fmt(host.get("msgs_per_s")),
        _fmt(host.get("sum_process_msgs_per_s")),
        f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-",
        f"{_fmt(p50, '.1f')} / {_fmt(p99, '.1f')}",
        _fmt(statistics.fmean(b["mean_batch_size"] for b in batches) if batches else None),
        _fmt(max(b["token_budget_max"] for b in batches) if batches else None),
        _fmt(statistics.fmean(p["loop_cpu_us_per_msg"] for p in procs) if procs else None),
        _fmt(statistics.fmean(p["process_cpu_us_per_msg"] for p in procs) if procs else None),
        "-" if busy is None else f"{busy:.0f}%",
        _fmt(host.get("gpu_memory_peak_mib")),
    ]


def print_table(doc: Mapping[str, Any]) -> None:
    print()
    print(" | ".join(f"{name:>{width}}" for name, width in COLUMNS))
    for s in doc["sections"]:
        if "processes" in s and "host" in s:
            print(" | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(table_row(s), COLUMNS, strict=True)))
        for e in s.get("errors", []):
            print(f"   N={s.get('processes')} process {e.get('index')}: {e.get('error')}")
    print()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder (default: EMOTION_STREAM_MODEL__PATH, else .gpu/model, else the built model).",
)
@click.option(
    "--texts",
    type=click.Path(path_type=Path),
    default=None,
    help="GoEmotions TSV of texts (default: .gpu/dev.tsv, else the settings' dev split).",
)
@click.option(
    "--messages",
    type=str,
    default=None,
    help="Messages per process: one number, or one per --processes entry (default 100k, 60k, 40k, 25k "
    "for 1, 2, 4, 8 processes).",
)
@click.option(
    "--processes", "processes_arg", default="1,2,4,8", show_default=True, help="Process counts, one section each."
)
@click.option(
    "--time-limit-s",
    type=float,
    default=90.0,
    show_default=True,
    help="Bound of one section, engine start included; a cut section reports what it drained.",
)
@click.option("--partitions", type=int, default=8, show_default=True, help="Input partitions per process.")
@click.option("--per-partition", type=int, default=500, show_default=True, help="Most records per partition per fetch.")
@click.option("--conversations", type=int, default=64, show_default=True, help="Conversation ids (record keys).")
@click.option("--cpu-smoke", is_flag=True, help="On the CPU: 300 messages, processes 1,2 (checks the script itself).")
@click.option("--check-imports", is_flag=True, help="Print where each imported distribution comes from on the device.")
@click.option(
    "--wheels",
    type=click.Path(path_type=Path),
    default=ROOT / ".gpu" / "whl",
    show_default=True,
    help="The carried wheels, for --check-imports.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Results file (default: $OUT/worker-gpu.json, else benchmarks/results/worker-gpu[-cpu-smoke].json).",
)
@click.option("--child", type=int, default=None, hidden=True)
@click.option("--section-dir", type=click.Path(path_type=Path), default=None, hidden=True)
def main(
    model: Path | None,
    texts: Path | None,
    messages: str | None,
    processes_arg: str,
    time_limit_s: float,
    partitions: int,
    per_partition: int,
    conversations: int,
    cpu_smoke: bool,
    check_imports: bool,
    wheels: Path,
    out_path: Path | None,
    child: int | None,
    section_dir: Path | None,
) -> None:
    """Run the worker's host path on a GPU with 1..N processes; see the module docstring."""
    opts = {"partitions": partitions, "per_partition": per_partition, "conversations": conversations,
            "time_limit_s": time_limit_s}  # fmt: skip
    if child is not None:
        assert section_dir is not None and texts is not None and messages is not None
        run_child(child, section_dir, texts, int(messages), opts)
        return
    started = time.monotonic()
    env = dict(os.environ)
    for key, value in (CPU_ENV if cpu_smoke else GPU_ENV).items():
        env.setdefault(key, value)
    if model is None and "EMOTION_STREAM_MODEL__PATH" not in env and (ROOT / ".gpu" / "model").is_dir():
        model = ROOT / ".gpu" / "model"
    if model is not None:
        env["EMOTION_STREAM_MODEL__PATH"] = str(model.resolve())
    if texts is None:
        texts = ROOT / ".gpu" / "dev.tsv"
        if not texts.is_file():
            from stream_app.settings import load_settings

            texts = load_settings().data.goemotions_dir / "dev.tsv"
    counts = [int(x) for x in processes_arg.split(",") if x.strip()]
    if cpu_smoke:
        counts = [c for c in counts if c <= 2] or [1, 2]
        if processes_arg == "1,2,4,8":
            counts = [1, 2]
    per_n: dict[int, int]
    if messages is None:
        per_n = {n: (300 if cpu_smoke else DEFAULT_MESSAGES.get(n, 20_000)) for n in counts}
    else:
        given = [int(x) for x in messages.split(",")]
        per_n = {n: given[i] if len(given) > 1 else given[0] for i, n in enumerate(counts)}
    workdir = Path(tempfile.mkdtemp(prefix="gpu-worker-"))
    # one cache folder for the run: the first section's processes run the engine selection and store it,
    # later ones start from it (the worker's selection cache), and state folders live there too
    env.setdefault("EMOTION_STREAM_CACHE_DIR", str(workdir / "cache"))
    env.setdefault("EMOTION_STREAM_WORKER__STATE_DIR", str(workdir / "state"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
    os.environ.update(env)  # the supervisor's settings (worker id, state folder) come from this environment
    if out_path is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
        out_path = base / ("worker-gpu-cpu-smoke.json" if cpu_smoke else "worker-gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "worker-gpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "cpu_smoke": cpu_smoke,
        "model": env.get("EMOTION_STREAM_MODEL__PATH"),
        "texts": str(texts),
        "env": {k: v for k, v in env.items() if k.startswith("EMOTION_STREAM_") or k in ("RAYON_NUM_THREADS", "OMP_WAIT_POLICY", "PYTHONPATH")},  # noqa: E501
        "device": _device_facts(),
        "method": "core pipeline as the worker builds it; in-memory sink acknowledging at once (no Kafka); "
        "window 5%-95% of outputs; batch times from stage_metrics.v1 (stage_ms.infer)",
        "sections": [],
    }  # fmt: skip

    def write() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out_path)

    write()
    try:
        for n in counts:
            t = time.monotonic()
            try:
                section = run_section(n, per_n[n], {**opts, "texts": texts}, env, workdir)
            except Exception as exc:  # noqa: BLE001 -- the next section may still run; recorded
                section = {
                    "processes": n,
                    "errors": [{"index": None, "error": repr(exc), "traceback": traceback.format_exc()}],
                }
            section["section_s"] = round(time.monotonic() - t, 2)
            doc["sections"].append(section)
            doc["imports"] = import_check(
                {d for s in doc["sections"] for d in s.get("imported_distributions", [])}
                | set(imported_distributions()),
                wheels,
            )
            write()
            host = section.get("host", {})
            print(f"N={n}: host {_fmt(host.get('msgs_per_s'))} msg/s, {section.get('outputs', 0)} outputs, "
                  f"{section['section_s']} s, errors {len(section.get('errors', []))}", flush=True)  # fmt: skip
    finally:
        doc["total_s"] = round(time.monotonic() - started, 2)
        write()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(doc)
    first = next((s for s in doc["sections"] if s.get("per_process")), None)
    if first is not None:
        eng = (first["per_process"][0] or {}).get("engine") or {}
        print(f"engine {eng.get('name')} on {eng.get('device')}, start {eng.get('start_s')} s "
              f"(cached selection: {eng.get('cached_selection')}); versions {first.get('versions')}")  # fmt: skip
    if check_imports:
        print("imported third-party distributions (where each comes from on the device):")
        for dist, where in doc.get("imports", {}).items():
            print(f"  {dist:<24} {where}")
    print(f"results: {out_path}")
    # exit 1 when a process failed; the import check only informs (on the device, what was imported was there)
    if any(s.get("errors") for s in doc["sections"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
