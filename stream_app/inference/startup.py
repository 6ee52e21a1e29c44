"""Starting the inference engine fast: the API the worker calls, and the selection cache behind it.

:func:`start_engine` returns a loaded, parity-checked and warmed engine with a breakdown of where the time
went (``import``, ``engine_load``, ``warmup``; the ``emotion_cold_start_seconds{phase}`` gauge).

The first start on a host runs the whole selection (:func:`~stream_app.inference.select.select_engine`:
every candidate loaded, checked against PyTorch fp32, checked for batch invariance on a CPU, timed) and
writes its outcome to ``<cache_dir>/engine-selection/<model version>/<key>.json``, where the key covers
what could change the outcome: the model version, the requested engine, device, dtype and threads, the
parity sample and thresholds, the host (CPU model and instruction-set flags, usable cores, CUDA device)
and the versions of every library involved. It also stores the PyTorch reference probabilities of the
parity sample beside it (``reference.json``; ``emotion-stream model export`` ships the same file in the
model folder), and in the entry itself the reference rows this selection gated with (from ONNX fp32
where PyTorch is not installed).

A restart with the same key loads only the chosen engine and imports only what that engine needs (an
ONNX worker imports neither torch nor transformers), checks it against the stored reference on the
parity sample, which doubles as warm-up, and re-reports the cached step-downs through ``on_fallback``.
If that check fails (an ONNX file replaced under the cache), the cache entry is dropped and the full
selection runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from stream_app.errors import EngineError, ModelError
from stream_app.inference._files import atomic_target
from stream_app.inference._optional import MissingExtraError, installed_version, require
from stream_app.inference.base import (
    Engine,
    FloatArray,
    available_cores,
    labels_from_config,
    model_identity,
    read_model_config,
)
from stream_app.inference.fallback import FallbackEngine, OnFallback, close_quietly
from stream_app.inference.onnx_export import INT8_SCHEME
from stream_app.inference.parity import (
    REFERENCE_FILE,
    ParityResult,
    ReferenceProbs,
    check_parity,
    default_parity_texts,
    load_reference,
    save_reference,
    texts_digest,
)
from stream_app.inference.select import (
    _TIMING_BATCH_ROWS,
    DeviceChoice,
    EngineChoice,
    GpuDtype,
    SelectionReport,
    _plan,
    _predict_all,
    _sample_order,
    _timing_batches,
    resolve_device,
    select_engine,
    warm_up,
)
from stream_app.inference.tokenize import TextEncoder

__all__ = ["PHASES", "EngineStart", "cache_key", "host_fingerprint", "process_age_s", "start_engine"]

log = logging.getLogger(__name__)

PHASES = ("import", "engine_load", "warmup")
"""The phases of :attr:`EngineStart.phases`, in order."""

_SELECTION_DIR = "engine-selection"
_SCHEMA = 1
_LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "onnx", "torch", "transformers", "tokenizers", "numpy")
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512", "vnni", "amx", "bf16", "sse4", "neon", "asimd", "sve")


@dataclass(frozen=True)
class EngineStart:
    """A started engine and how its start went.

    Attributes:
        engine: the engine to serve with (ONNX inside a :class:`FallbackEngine` to PyTorch).
        encoder: the tokenizer, loaded for the same model and token limit.
        report: the selection report (from the cache on a warm start).
        phases: seconds per phase of :data:`PHASES`: ``import`` (the tokenizer's and the engine's runtime
            libraries), ``engine_load`` (tokenizer, cache lookup, session or model load; on a cold start
            the whole selection, PyTorch's import included) and ``warmup`` (the parity run on a warm
            start, then representative shapes). Imports done before the call (the interpreter, numpy,
            this package) are in :attr:`process_age_s`, not here.
        cached: the selection came from the cache (no candidate was loaded or timed but the chosen one).
        parity: this start's comparison of the serving engine with the reference (None when the gate is
            off, or on a cold start, where the selection report holds it).
        cache_file: the selection cache entry read or written (None without a cache directory).
        process_age_s: seconds from the process's start to the engine being ready (Linux; else None).
    """

    engine: Engine
    encoder: TextEncoder
    report: SelectionReport
    phases: Mapping[str, float]
    cached: bool
    parity: ParityResult | None = None
    cache_file: Path | None = None
    process_age_s: float | None = None
    fallbacks: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)

    @property
    def seconds(self) -> float:
        """Sum of the phases: from the call to a warmed engine."""
        return sum(self.phases.values())


class _Clock:
    """Accumulates seconds per phase; a block is charged to one phase."""

    def __init__(self) -> None:
        self.phases = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - start


def process_age_s() -> float | None:
    """Seconds since this process started (from ``/proc``; 10 ms resolution), None where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="ascii")
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _cpu_description() -> dict[str, Any]:
    """CPU model and the instruction-set flags that pick kernels (from ``/proc/cpuinfo`` on Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or fields.get("cpu model") or platform.processor() or "unknown"
    flags = (fields.get("flags") or fields.get("features") or "").split()
    relevant = sorted(f for f in flags if any(marker in f for marker in _CPU_FLAGS))
    return {"model": model, "machine": platform.machine(), "isa": relevant}


def _cuda_name(device: str) -> str | None:
    """The CUDA device's name, from the driver's ``/proc`` entries (no CUDA library), else torch; None on
    a CPU."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    if index < len(gpus):
        try:
            for line in gpus[index].read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    return value.strip()
        except OSError:
            pass
    try:
        import torch

        return str(torch.cuda.get_device_name(index))
    except (ImportError, RuntimeError, AssertionError):
        return "cuda (unnamed)"


def host_fingerprint(device: str) -> dict[str, Any]:
    """What about this host can change which engine wins or whether it passes: CPU, cores, GPU, libraries."""
    return {
        "cpu": _cpu_description(),
        "cores": available_cores(),
        "cuda": _cuda_name(device),
        "python": platform.python_version(),
        "libraries": {name: installed_version(name) for name in _LIBRARIES},
        "int8_scheme": INT8_SCHEME,
    }


def cache_key(
    *,
    model_name: str,
    model_version: str,
    engine: str,
    device: str,
    gpu_dtype: str,
    num_threads: int,
    cpu_spin_wait: bool,
    parity_texts: Sequence[str],
    max_length: int,
    min_top1_agreement: float,
    max_prob_diff: float,
    tie_margin: float | None,
) -> dict[str, Any]:
    """The selection cache key: every input that can change the selection's outcome."""
    return {
        "schema": _SCHEMA,
        "model": {"name": model_name, "version": model_version},
        "request": {
            "engine": engine,
            "device": device,
            "gpu_dtype": gpu_dtype,
            "num_threads": num_threads,
            "cpu_spin_wait": cpu_spin_wait,
        },
        "parity": {
            "texts": texts_digest(parity_texts),
            "count": len(parity_texts),
            "max_length": max_length,
            "min_top1_agreement": min_top1_agreement,
            "max_prob_diff": max_prob_diff,
            "tie_margin": tie_margin,
        },
        "host": host_fingerprint(device),
    }


def _key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_entry(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("engine selection cache %s is unreadable (%s); selecting again", path, exc)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry


def start_engine(
    model_path: str | Path,
    *,
    engine: EngineChoice = "auto",
    device: DeviceChoice | str = "auto",
    gpu_dtype: GpuDtype = "float16",
    num_threads: int = 0,
    cache_dir: Path | None = None,
    parity_texts: Sequence[str] | None = None,
    min_top1_agreement: float = 0.97,
    max_prob_diff: float = 0.1,
    tie_margin: float | None = None,
    max_length: int = 128,
    on_fallback: OnFallback | None = None,
    cpu_spin_wait: bool = False,
    warmup_texts: Sequence[str] | None = None,
    use_cache: bool = True,
) -> EngineStart:
    """Load, check and warm the engine the worker serves with, reusing the cached selection when valid.

    Args:
        model_path: model folder (a hub id works too, but then only PyTorch can serve it).
        engine, device, gpu_dtype, num_threads, min_top1_agreement, max_prob_diff, tie_margin,
            max_length, on_fallback, cpu_spin_wait: as for
            :func:`~stream_app.inference.select.select_engine`.
        cache_dir: ``settings.data.cache_dir``: ONNX exports and the selection cache live under it;
            None disables the selection cache.
        parity_texts: the gate's sample; None = the packaged sample
            (:func:`~stream_app.inference.parity.default_parity_texts`).
        warmup_texts: texts for the warm-up shapes; None = the parity sample.
        use_cache: read the selection cache (a fresh selection is written either way).

    Raises:
        ModelError: the model folder cannot be loaded.
        EngineError: no engine loads (not even PyTorch), or a needed package is missing (naming the extra).
    """
    clock = _Clock()
    texts = list(default_parity_texts() if parity_texts is None else parity_texts)
    warm_texts = list(texts if warmup_texts is None else warmup_texts)
    with clock.phase("import"):
        require("tokenizers", "the tokenizer")  # its runtime, charged to the import phase
    with clock.phase("engine_load"):
        resolved = resolve_device(device)
        encoder = TextEncoder.from_pretrained(model_path, max_length)
        identity = _identity(model_path)
    entry_path: Path | None = None
    entry: dict[str, Any] | None = None
    key: dict[str, Any] = {}
    if cache_dir is not None and identity is not None:
        with clock.phase("engine_load"):
            key = cache_key(
                model_name=identity[0],
                model_version=identity[1],
                engine=engine,
                device=resolved,
                gpu_dtype=gpu_dtype,
                num_threads=num_threads,
                cpu_spin_wait=cpu_spin_wait,
                parity_texts=texts,
                max_length=max_length,
                min_top1_agreement=min_top1_agreement,
                max_prob_diff=max_prob_diff,
                tie_margin=tie_margin,
            )
            entry_path = Path(cache_dir) / _SELECTION_DIR / identity[1] / f"{_key_digest(key)}.json"
            entry = _read_entry(entry_path, key) if use_cache else None
    reference = _stored_reference(model_path, cache_dir, identity, texts, max_length)

    def plan_spec(name: str) -> tuple[Callable[[], Engine], Callable[[], Engine]]:
        plan = _plan(model_path, engine, resolved, gpu_dtype, num_threads, cache_dir, cpu_spin_wait)
        for spec in [*plan.candidates, plan.runtime_fallback]:
            if spec.name == name:
                return spec.factory, plan.runtime_fallback.factory
        raise EngineError(f"cached engine {name!r} is not a candidate for engine={engine} on {resolved}")

    # The shared PyTorch reference when there is one, else the rows this host's selection gated with.
    warm_reference = reference.probs if reference is not None else _entry_reference(entry, len(texts))
    if entry is not None and (warm_reference is not None or not texts):
        started = _warm_start(
            entry,
            plan_spec,
            encoder,
            texts,
            warm_reference,
            clock,
            resolved,
            min_top1_agreement=min_top1_agreement,
            max_prob_diff=max_prob_diff,
            tie_margin=tie_margin,
            on_fallback=on_fallback,
        )
        if started is not None:
            served, report, parity, fallbacks = started
            with clock.phase("warmup"):
                warm_up(served, encoder, warm_texts, batch_sizes=(1, 8))
            return EngineStart(
                served,
                encoder,
                report,
                MappingProxyType(dict(clock.phases)),
                cached=True,
                parity=parity,
                cache_file=entry_path,
                process_age_s=process_age_s(),
                fallbacks=fallbacks,
            )
        if entry_path is not None:
            entry_path.unlink(missing_ok=True)

    if engine != "torch":  # every other plan has ONNX candidates; PyTorch loads inside the selection
        with clock.phase("import"):
            try:
                _import_runtime("onnx")
            except MissingExtraError as exc:
                log.warning("%s", exc)
    with clock.phase("engine_load"):
        selection = select_engine(
            model_path,
            engine=engine,
            device=resolved,
            gpu_dtype=gpu_dtype,
            num_threads=num_threads,
            cache_dir=cache_dir,
            parity_texts=texts,
            min_top1_agreement=min_top1_agreement,
            max_prob_diff=max_prob_diff,
            on_fallback=on_fallback,
            tie_margin=tie_margin,
            max_length=max_length,
            encoder=encoder,
            cpu_spin_wait=cpu_spin_wait,
            reference=None if reference is None else reference.probs,
            reference_source=f"stored: {reference.source}" if reference is not None else "",
        )
    if identity is not None and cache_dir is not None and entry_path is not None:
        _save(entry_path, key, selection.report, selection.fallbacks, selection.reference)
        if selection.reference is not None and reference is None and selection.report.reference == "torch":
            labels = labels_from_config(read_model_config(model_path))
            stored = ReferenceProbs(tuple(texts), selection.reference, labels, max_length, identity[1], _torch_source())
            save_reference(Path(cache_dir) / _SELECTION_DIR / identity[1] / REFERENCE_FILE, stored)
    with clock.phase("warmup"):
        warm_up(selection.engine, encoder, warm_texts)
    return EngineStart(
        selection.engine,
        encoder,
        selection.report,
        MappingProxyType(dict(clock.phases)),
        cached=False,
        cache_file=entry_path,
        process_age_s=process_age_s(),
        fallbacks=selection.fallbacks,
    )


def _identity(model_path: str | Path) -> tuple[str, str] | None:
    """``(name, version)`` of a model folder; None for a hub id (no selection cache then)."""
    try:
        return model_identity(model_path)
    except ModelError:
        if Path(model_path).exists():
            raise
        return None


def _torch_source() -> str:
    version = (installed_version("torch") or "?").split("+")[0]
    return f"torch-{version} fp32 cpu"


def _stored_reference(
    model_path: str | Path,
    cache_dir: Path | None,
    identity: tuple[str, str] | None,
    texts: Sequence[str],
    max_length: int,
) -> ReferenceProbs | None:
    if identity is None or not texts:
        return None
    files = [Path(model_path) / "onnx" / REFERENCE_FILE]
    if cache_dir is not None:
        files.append(Path(cache_dir) / _SELECTION_DIR / identity[1] / REFERENCE_FILE)
    labels = labels_from_config(read_model_config(model_path))
    return load_reference(files, texts, labels=labels, max_length=max_length, model_version=identity[1])


def _warm_start(
    entry: Mapping[str, Any],
    plan_spec: Callable[[str], tuple[Callable[[], Engine], Callable[[], Engine]]],
    encoder: TextEncoder,
    texts: Sequence[str],
    reference: FloatArray | None,
    clock: _Clock,
    device: str,
    *,
    min_top1_agreement: float,
    max_prob_diff: float,
    tie_margin: float | None,
    on_fallback: OnFallback | None,
) -> tuple[Engine, SelectionReport, ParityResult | None, tuple[tuple[str, str, str], ...]] | None:
    """Load the cached choice and check it on the parity sample; None when it must be selected again."""
    try:
        report = SelectionReport.from_dict(entry["report"])
        fallbacks = tuple((str(a), str(b), str(c)) for a, b, c in entry.get("fallbacks", ()))
        factory, fallback_factory = plan_spec(report.chosen.name)
    except (KeyError, TypeError, ValueError, EngineError) as exc:
        log.warning("engine selection cache entry unusable (%s); selecting again", exc)
        return None
    with clock.phase("import"):
        _import_runtime(report.chosen.kind)
    start = time.perf_counter()
    try:
        with clock.phase("engine_load"):
            engine = factory()
    except (EngineError, ModelError, OSError, RuntimeError, ValueError) as exc:
        log.warning("cached engine %s failed to load (%s); selecting again", report.chosen.name, exc)
        return None
    parity: ParityResult | None = None
    if texts and reference is not None:
        with clock.phase("warmup"):
            rows = _TIMING_BATCH_ROWS["cuda" if device.startswith("cuda") else "cpu"]
            probs = _predict_all(engine, _timing_batches(encoder, texts, rows))
            expected = reference[_sample_order(encoder, texts)]
            parity = check_parity(
                probs,
                expected,
                min_top1_agreement=min_top1_agreement,
                max_prob_diff=max_prob_diff,
                tie_margin=tie_margin,
            )
        if not parity.passed:
            log.warning(
                "cached engine %s no longer passes the parity gate (%s); selecting again",
                report.chosen.name,
                parity.reason,
            )
            close_quietly(engine)
            return None
    for from_engine, to_engine, reason in fallbacks:
        log.warning("engine fallback %s -> %s (cached selection): %s", from_engine, to_engine, reason)
        if on_fallback is not None:
            on_fallback(from_engine, to_engine, reason)
    served: Engine = engine
    if engine.info.kind == "onnx":
        served = FallbackEngine(engine, fallback_factory, on_fallback)
    log.info(
        "engine %s on %s from the selection cache (loaded and checked in %.2fs)",
        engine.info.name,
        device,
        time.perf_counter() - start,
    )
    return served, report, parity, fallbacks


def _import_runtime(kind: str) -> None:
    """Import the runtime of an engine kind up front, so its cost shows as the ``import`` phase."""
    if kind == "onnx":
        require("onnxruntime", "the ONNX engine")
    else:
        require("torch", "the PyTorch engine")
        require("transformers", "the PyTorch engine")


def _entry_reference(entry: Mapping[str, Any] | None, rows: int) -> FloatArray | None:
    """The reference rows a cache entry's selection gated with (parity-text order), if well formed."""
    if entry is None or not isinstance(entry.get("reference"), list):
        return None
    try:
        probs = np.asarray(entry["reference"], dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return probs if probs.ndim == 2 and probs.shape[0] == rows else None


def _save(
    path: Path,
    key: Mapping[str, Any],
    report: SelectionReport,
    fallbacks: Sequence[tuple[str, str, str]],
    reference: FloatArray | None,
) -> None:
    entry = {
        "key": key,
        "chosen": report.chosen.name,
        "fallbacks": [list(f) for f in fallbacks],
        "report": report.as_dict(),
        "reference": None if reference is None else reference.astype(np.float64).round(8).tolist(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with atomic_target(path) as tmp:
            tmp.write_text(json.dumps(entry, indent=1, default=_json_default) + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the engine selection cache %s: %s", path, exc)


def _json_default(value: object) -> object:
    if isinstance(value, np.floating | np.integer):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
