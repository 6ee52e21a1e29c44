"""Choosing an engine: candidates, the parity gate, batch invariance, timing, fallback and warm-up.

:func:`select_engine` tries the candidates for the device in expected speed order (CPU: ONNX INT8, ONNX
fp32, PyTorch; CUDA: ONNX fp16, PyTorch fp16/bf16, ONNX fp32, PyTorch fp32). Each one must load and agree
with the PyTorch fp32 reference on a fixed text sample (top-1 agreement and largest probability
difference); on a CPU it must also give a text the same scores alone as in a padded batch with other
texts (:func:`~stream_app.inference.parity.batch_invariance`), so a replay never changes a label. The
passing candidates are timed on that sample and the fastest wins. PyTorch is the floor: whatever fails,
the worker still starts. An ONNX engine is returned inside a :class:`FallbackEngine`, so a run-time
failure switches to PyTorch for good instead of stopping the stream.

The reference probabilities come from the caller when it has them stored
(:mod:`stream_app.inference.parity`), else from PyTorch fp32, else (PyTorch not installed) from ONNX fp32,
whose export was checked against PyTorch when it was made. :mod:`stream_app.inference.startup` caches the
outcome per model and host, so a restart does none of this.

``on_fallback(from_engine, to_engine, reason)`` reports every step down. ``reason`` starts with a fixed
code (``load_failed``, ``parity_failed``, ``unsupported``, ``predict_failed``) followed by ``": "`` and
free text, so a metrics label can use the code alone (``nondeterministic`` for a failed invariance check).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_app.errors import EngineError, ModelError
from stream_app.inference._optional import MissingExtraError
from stream_app.inference.base import Engine, EngineInfo, FloatArray
from stream_app.inference.fallback import FallbackEngine, OnFallback, close_quietly
from stream_app.inference.parity import ParityResult, batch_invariance, check_parity
from stream_app.inference.tokenize import EncodedBatch, TextEncoder

__all__ = [
    "BUILTIN_PARITY_TEXTS",
    "INVARIANCE_TOLERANCE",
    "CandidateResult",
    "DeviceChoice",
    "EngineChoice",
    "FallbackEngine",
    "GpuDtype",
    "OnFallback",
    "ParityResult",
    "Selection",
    "SelectionReport",
    "check_parity",
    "load_engine",
    "resolve_device",
    "select_engine",
    "warm_up",
]

log = logging.getLogger(__name__)

EngineChoice = Literal["auto", "torch", "onnx", "onnx-int8"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
GpuDtype = Literal["float16", "bfloat16", "float32"]

_TIMING_BATCH_ROWS = {"cpu": 32, "cuda": 512}
_TIMING_REPEATS = 3
INVARIANCE_TOLERANCE = 1e-5
"""Largest probability change allowed between a text scored alone and in a padded batch (CPU candidates)."""

BUILTIN_PARITY_TEXTS: tuple[str, ...] = (
    "I can't believe they cancelled the show, this is outrageous!",
    "That is the most disgusting thing I have ever seen.",
    "I'm really scared about the exam tomorrow.",
    "Thank you so much, this made my day :)",
    "The meeting is at 3pm in room 204.",
    "I miss her every single day.",
    "Wait, what? He actually won the lottery?",
    "lol",
    "Why would anyone ever do that to a dog? Makes me sick.",
    "ok",
    "This game is so much fun, love playing with you all!",
    "I'm so sorry for your loss.",
    "Stop spamming the chat or you'll be banned.",
    "Honestly I didn't expect that ending at all, wow.",
    "I'm nervous, my heart is racing and I can't sleep.",
    "gg wp everyone",
    "Can someone explain how the new update works?",
    "You're an idiot and everyone knows it.",
    "Finally got the job!!! So happy right now",
    "It's raining again. Whatever.",
    "That spider in my shower nearly gave me a heart attack",
    "ugh, the food was rotten and smelled awful",
    "My grandma passed away last night and I feel empty.",
    "No way, that's incredible news!",
)
"""A fixed, varied sample for the parity gate when the caller has none (the worker passes dev texts)."""


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """What happened to one candidate during selection.

    Attributes:
        name: engine label (``onnx-int8``, ``onnx``, ``torch``, ``torch-fp16``...).
        loaded: it loaded (and, for ONNX, exported) without error.
        passed: it loaded and passed the parity gate (and, on a CPU, the batch-invariance check).
        top1_agreement: share of parity texts whose top label matches the reference (None if not run).
        decisive_agreement: the gated agreement, near ties excused (see :class:`ParityResult`).
        max_prob_diff: largest absolute probability difference to the reference (None if not run).
        ms_per_batch: median time of one timing batch (None if not timed).
        load_s: seconds to load (including any ONNX export or quantisation on first use).
        reason: why it was rejected, or None.
        batch_invariance: largest probability change of a text between scored alone and in a padded
            batch (None if not checked).
    """

    name: str
    loaded: bool
    passed: bool
    top1_agreement: float | None = None
    decisive_agreement: float | None = None
    max_prob_diff: float | None = None
    ms_per_batch: float | None = None
    load_s: float | None = None
    reason: str | None = None
    batch_invariance: float | None = None


@dataclass(frozen=True, slots=True)
class SelectionReport:
    """The outcome of :func:`select_engine`.

    Attributes:
        chosen: the engine that serves traffic.
        requested: the ``engine`` argument.
        device: the resolved device.
        candidates: every candidate tried, in trial order.
        cold_start_s: from the start of the chosen engine's load to its first prediction.
        selection_s: the whole selection, reference and every candidate included.
        fallback_reasons: one entry per step down, ``"from -> to: reason"``.
        reference: what the parity reference probabilities came from (``stored: ...``, ``torch``,
            ``onnx (torch not installed)``), empty when the gate was disabled.
    """

    chosen: EngineInfo
    requested: str
    device: str
    candidates: tuple[CandidateResult, ...]
    cold_start_s: float
    selection_s: float
    fallback_reasons: tuple[str, ...] = field(default_factory=tuple)
    reference: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for logs, the profile report, benchmarks and the selection cache)."""
        data = asdict(self)
        data["chosen"]["name"] = self.chosen.name
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionReport:
        """Inverse of :meth:`as_dict`.

        Raises:
            KeyError, TypeError, ValueError: not a report written by :meth:`as_dict`.
        """
        chosen = {k: v for k, v in data["chosen"].items() if k != "name"}
        return cls(
            chosen=EngineInfo(**chosen),
            requested=str(data["requested"]),
            device=str(data["device"]),
            candidates=tuple(CandidateResult(**c) for c in data["candidates"]),
            cold_start_s=float(data["cold_start_s"]),
            selection_s=float(data["selection_s"]),
            fallback_reasons=tuple(data.get("fallback_reasons", ())),
            reference=str(data.get("reference", "")),
        )


@dataclass(frozen=True)
class Selection:
    """What :func:`select_engine` returns.

    Attributes:
        engine: the engine to serve with (an ONNX engine comes inside a :class:`FallbackEngine`).
        report: the selection report.
        reference: the reference probabilities of the parity sample (rows in ``parity_texts`` order),
            None when the gate was disabled.
        fallbacks: ``(from_engine, to_engine, reason)`` for each step down reported to ``on_fallback``.
    """

    engine: Engine
    report: SelectionReport
    reference: FloatArray | None
    fallbacks: tuple[tuple[str, str, str], ...] = ()


def _nvidia_gpu_shown() -> bool:
    """The NVIDIA driver shows at least one GPU (``/proc/driver/nvidia/gpus/*`` or ``/dev/nvidia0``)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def _cuda_visible() -> bool | None:
    """Whether an NVIDIA GPU can be present, without importing torch: False when the driver shows none
    or ``CUDA_VISIBLE_DEVICES`` hides every device, None when only a CUDA runtime can tell."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if Path("/proc/driver").is_dir() and not _nvidia_gpu_shown():
        return False
    return None


def resolve_device(device: DeviceChoice | str) -> str:
    """``auto`` -> ``cuda:0`` when a CUDA GPU is usable, else ``cpu``; ``cuda`` -> ``cuda:0``.

    A host whose driver shows no NVIDIA GPU resolves ``auto`` to ``cpu`` without importing torch (a CPU
    worker's start must not pay for it), and so does a GPU host with ``onnxruntime-gpu`` (its CUDA
    provider serves there). Otherwise torch decides when installed.

    Raises:
        EngineError: ``cuda`` was asked for and none is usable, or an unknown device name.
    """
    if device == "cpu":
        return "cpu"
    if device != "auto" and not device.startswith("cuda"):
        raise EngineError(f"unknown device {device!r} (auto, cpu or cuda)")
    available = False if _cuda_visible() is False else _cuda_available()
    if device == "auto":
        return "cuda:0" if available else "cpu"
    if not available:
        raise EngineError(f"device={device} but no CUDA device is usable here")
    return "cuda:0" if device == "cuda" else device


def _cuda_available() -> bool:
    from stream_app.inference._optional import installed_version

    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers() and _nvidia_gpu_shown():
            return True
    except ImportError:
        pass
    if installed_version("torch") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    factory: Callable[[], Engine]
    is_reference: bool = False


def _torch_dtype_name(dtype: GpuDtype) -> str:
    return {"float16": "torch-fp16", "bfloat16": "torch-bf16", "float32": "torch"}[dtype]


@dataclass(frozen=True, slots=True)
class _Plan:
    candidates: list[_Spec]
    reference: _Spec
    runtime_fallback: _Spec
    unsupported: list[tuple[str, str]]
    onnx_reference: _Spec


def _plan(
    path: str | Path,
    requested: EngineChoice,
    device: str,
    gpu_dtype: GpuDtype,
    num_threads: int,
    cache_dir: Path | None,
    cpu_spin_wait: bool = False,
) -> _Plan:
    """Candidates in expected speed order, the parity reference, and the run-time fallback.

    Nothing is imported or loaded here: the engine modules import their runtimes when constructed.
    """
    from stream_app.inference import onnx_engine, torch_engine

    cuda = device.startswith("cuda")

    def onnx(precision: Literal["fp32", "int8", "fp16"], on: str = device) -> _Spec:
        name = "onnx" if precision == "fp32" else f"onnx-{precision}"
        return _Spec(
            name,
            lambda: onnx_engine.OnnxEngine(
                path, precision, on, num_threads, cache_dir=cache_dir, allow_spinning=cpu_spin_wait
            ),
        )

    reference = _Spec(
        "torch", lambda: torch_engine.TorchEngine(path, device, "float32", num_threads), is_reference=True
    )
    torch_fast = reference
    if cuda and gpu_dtype != "float32":
        torch_fast = _Spec(
            _torch_dtype_name(gpu_dtype), lambda: torch_engine.TorchEngine(path, device, gpu_dtype, num_threads)
        )
    unsupported: list[tuple[str, str]] = []
    candidates: list[_Spec]
    if requested == "torch":
        candidates = [torch_fast]
    elif requested == "onnx":
        candidates = [onnx("fp16" if cuda and gpu_dtype == "float16" else "fp32")]
    elif requested == "onnx-int8" and cuda:
        unsupported.append(("onnx-int8", "INT8 runs on the CPU provider only"))
        candidates = [torch_fast]
    elif requested == "onnx-int8":
        candidates = [onnx("int8")]
    elif not cuda:
        candidates = [onnx("int8"), onnx("fp32"), reference]
    elif gpu_dtype == "float16":
        candidates = [onnx("fp16"), torch_fast, onnx("fp32"), reference]
    elif gpu_dtype == "bfloat16":
        # ONNX Runtime's fp16 conversion is the only half-precision ONNX path; bf16 stays with PyTorch.
        candidates = [torch_fast, onnx("fp32"), reference]
    else:
        candidates = [onnx("fp32"), reference]
    return _Plan(candidates, reference, torch_fast, unsupported, onnx("fp32", "cpu"))


def _timing_batches(encoder: TextEncoder, texts: Sequence[str], rows: int) -> list[EncodedBatch]:
    """The parity sample sorted by length, in batches of up to ``rows`` rows: what a busy worker runs.

    32 rows on a CPU; 512 on CUDA, where small batches only time Python's kernel launches (on an H100,
    fp16 and fp32 ran 32-row batches equally fast, while at 16k-token batches fp16 did 2.4x fp32).
    """
    items = sorted(enumerate(encoder.encode(texts)), key=lambda pair: pair[1].n_tokens)
    return [encoder.pad([item for _, item in items[i : i + rows]]) for i in range(0, len(items), rows)]


def _sample_order(encoder: TextEncoder, texts: Sequence[str]) -> list[int]:
    """The row order of :func:`_timing_batches`' output: text indices sorted by token count (stable)."""
    items = encoder.encode(texts)
    return sorted(range(len(items)), key=lambda i: items[i].n_tokens)


def _predict_all(engine: Engine, batches: Sequence[EncodedBatch]) -> FloatArray:
    outputs = [engine.predict(batch) for batch in batches]
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, len(engine.labels)), np.float32)


def _time_engine(engine: Engine, batches: Sequence[EncodedBatch]) -> float:
    """Median milliseconds per batch over a few passes (the first, untimed pass was the parity run)."""
    if not batches:
        return math.nan
    runs = []
    for _ in range(_TIMING_REPEATS):
        start = time.perf_counter()
        for batch in batches:
            engine.predict(batch)
        runs.append((time.perf_counter() - start) * 1000 / len(batches))
    return statistics.median(runs)


_LOAD_ERRORS = (EngineError, ModelError, OSError, RuntimeError, ValueError)


def load_engine(
    path: str | Path,
    *,
    engine: EngineChoice = "auto",
    device: DeviceChoice | str = "auto",
    gpu_dtype: GpuDtype = "float16",
    num_threads: int = 0,
    cache_dir: Path | None = None,
    parity_texts: Sequence[str] = BUILTIN_PARITY_TEXTS,
    min_top1_agreement: float = 0.97,
    max_prob_diff: float = 0.1,
    on_fallback: OnFallback | None = None,
    tie_margin: float | None = None,
    max_length: int = 128,
    encoder: TextEncoder | None = None,
    benchmark: bool = True,
    wrap_fallback: bool = True,
    cpu_spin_wait: bool = False,
    reference: FloatArray | None = None,
    reference_source: str = "stored",
    check_invariance: bool | None = None,
) -> tuple[Engine, SelectionReport]:
    """:func:`select_engine`, returning ``(engine, report)`` only (the form most callers want)."""
    selection = select_engine(
        path,
        engine=engine,
        device=device,
        gpu_dtype=gpu_dtype,
        num_threads=num_threads,
        cache_dir=cache_dir,
        parity_texts=parity_texts,
        min_top1_agreement=min_top1_agreement,
        max_prob_diff=max_prob_diff,
        on_fallback=on_fallback,
        tie_margin=tie_margin,
        max_length=max_length,
        encoder=encoder,
        benchmark=benchmark,
        wrap_fallback=wrap_fallback,
        cpu_spin_wait=cpu_spin_wait,
        reference=reference,
        reference_source=reference_source,
        check_invariance=check_invariance,
    )
    return selection.engine, selection.report


def select_engine(
    path: str | Path,
    *,
    engine: EngineChoice = "auto",
    device: DeviceChoice | str = "auto",
    gpu_dtype: GpuDtype = "float16",
    num_threads: int = 0,
    cache_dir: Path | None = None,
    parity_texts: Sequence[str] = BUILTIN_PARITY_TEXTS,
    min_top1_agreement: float = 0.97,
    max_prob_diff: float = 0.1,
    on_fallback: OnFallback | None = None,
    tie_margin: float | None = None,
    max_length: int = 128,
    encoder: TextEncoder | None = None,
    benchmark: bool = True,
    wrap_fallback: bool = True,
    cpu_spin_wait: bool = False,
    reference: FloatArray | None = None,
    reference_source: str = "stored",
    check_invariance: bool | None = None,
) -> Selection:
    """Load the best engine for ``device`` that passes the parity gate (and, on a CPU, is batch-invariant).

    Args:
        path: model folder.
        engine: ``auto`` (try every candidate), or one engine; a requested engine that fails to load,
            cannot run on the device, or fails the gate is replaced by PyTorch (reported, never silent).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        gpu_dtype: PyTorch precision on CUDA (``float16`` also makes ``onnx`` mean ONNX fp16 there).
        num_threads: CPU intra-op threads; 0 = one per core.
        cache_dir: where ONNX files are exported to when the model folder has none.
        parity_texts: the gate's sample (the worker passes ``parity_sample_size`` dev texts). Empty
            disables the gate, which is only sensible in tests.
        min_top1_agreement: least share of texts whose top label must match PyTorch fp32 (near ties
            excused, see :func:`check_parity`).
        max_prob_diff: largest absolute probability difference allowed.
        tie_margin: reference preference under which a changed top label counts as a near tie;
            None = ``max_prob_diff``, 0 = raw top-1 agreement.
        on_fallback: called ``(from_engine, to_engine, reason)`` for each rejected candidate that ranked
            ahead of the chosen one, and later by the :class:`FallbackEngine` on a run-time switch.
        max_length: token limit used to encode the parity sample (``model.max_length_tokens``).
        encoder: reuse this encoder instead of loading the tokenizer again.
        benchmark: time the passing candidates and keep the fastest; ``False`` keeps the first that
            passes (faster start-up, trusts the expected order).
        wrap_fallback: return an ONNX engine inside a :class:`FallbackEngine` to PyTorch.
        cpu_spin_wait: let ONNX Runtime's idle CPU threads spin (lower latency on a dedicated machine;
            on a small or shared one the spinning starves the consumer and tokenizer threads).
        reference: PyTorch fp32 probabilities of ``parity_texts`` (in that order) when the caller has them
            stored; PyTorch is then not run as a reference (it is still a candidate where the plan has it).
        reference_source: where ``reference`` came from, for the report.
        check_invariance: require each candidate to score a text the same alone as in a padded batch
            (within :data:`INVARIANCE_TOLERANCE`, no label change). None = on a CPU only: CUDA kernels
            are chosen by shape, and fp16 GEMMs differ in the last bits between shapes.

    Raises:
        ModelError: the model folder cannot be loaded at all.
        EngineError: not even the PyTorch engine loads on this device.
    """
    selection_start = time.perf_counter()
    resolved = resolve_device(device)
    encoder = encoder or TextEncoder.from_pretrained(path, max_length)
    plan = _plan(path, engine, resolved, gpu_dtype, num_threads, cache_dir, cpu_spin_wait)
    specs, reference_spec = plan.candidates, plan.reference
    texts = list(parity_texts)
    rows = _TIMING_BATCH_ROWS["cuda" if resolved.startswith("cuda") else "cpu"]
    batches = _timing_batches(encoder, texts, rows) if texts else []
    order = _sample_order(encoder, texts) if texts else []
    invariance_gate = (not resolved.startswith("cuda")) if check_invariance is None else check_invariance
    if not texts:
        log.warning("engine parity gate disabled: no parity texts")

    torch_reference: Engine | None = None  # the PyTorch fp32 engine, when it was loaded
    torch_first_output_s = 0.0
    sorted_reference: FloatArray | None = None  # reference rows in batch (sorted) order
    source = ""
    if reference is not None and texts:
        if reference.shape[0] != len(texts):
            raise EngineError(f"reference has {reference.shape[0]} rows for {len(texts)} parity texts")
        sorted_reference = np.asarray(reference, dtype=np.float32)[order]
        source = reference_source

    def load_torch_reference() -> tuple[Engine, FloatArray]:
        nonlocal torch_reference, torch_first_output_s
        start = time.perf_counter()
        if torch_reference is None:
            torch_reference = reference_spec.factory()
        probs = _predict_all(torch_reference, batches)
        torch_first_output_s = time.perf_counter() - start
        return torch_reference, probs

    def get_reference() -> FloatArray:
        """The reference rows (sorted order): stored, else PyTorch fp32, else ONNX fp32 without torch."""
        nonlocal sorted_reference, source
        if sorted_reference is None:
            try:
                _, sorted_reference = load_torch_reference()
                source = "torch"
            except MissingExtraError as torch_error:
                log.warning("no PyTorch for the parity reference (%s); using ONNX fp32", torch_error)
                onnx_reference = plan.onnx_reference.factory()
                try:
                    sorted_reference = _predict_all(onnx_reference, batches)
                finally:
                    close_quietly(onnx_reference)
                source = "onnx (torch not installed)"
        return sorted_reference

    results: list[CandidateResult] = []
    loaded: dict[str, tuple[Engine, float]] = {}  # name -> (engine, seconds from load start to 1st output)
    rejected: list[tuple[str, str]] = [(name, f"unsupported: {why}") for name, why in plan.unsupported]
    for name, why in plan.unsupported:
        results.append(CandidateResult(name, loaded=False, passed=False, reason=f"unsupported: {why}"))

    for spec in specs:
        start = time.perf_counter()
        try:
            if spec.is_reference and torch_reference is not None:
                candidate = torch_reference
                probs = _predict_all(candidate, batches)
                first_output_s = torch_first_output_s
            elif spec.is_reference:
                candidate, probs = load_torch_reference()
                first_output_s = torch_first_output_s
            else:
                candidate = spec.factory()
                probs = _predict_all(candidate, batches)
                first_output_s = time.perf_counter() - start
        except _LOAD_ERRORS as exc:
            failure = f"load_failed: {type(exc).__name__}: {exc}"
            log.warning("engine candidate %s rejected: %s", spec.name, failure)
            results.append(CandidateResult(spec.name, loaded=False, passed=False, reason=failure))
            rejected.append((spec.name, failure))
            continue
        parity = ParityResult(1.0, 0.0, True, None)
        invariance = None
        try:
            if texts and spec.is_reference and sorted_reference is None:
                sorted_reference, source = probs, "torch"
            if texts and not (spec.is_reference and source == "torch"):
                parity = check_parity(
                    probs,
                    get_reference(),
                    min_top1_agreement=min_top1_agreement,
                    max_prob_diff=max_prob_diff,
                    tie_margin=tie_margin,
                )
            if texts and invariance_gate and parity.passed:
                invariance = batch_invariance(candidate, encoder, texts)
        except _LOAD_ERRORS:
            if candidate is not torch_reference:
                close_quietly(candidate)
            raise
        reason: str | None = None
        if not parity.passed:
            reason = f"parity_failed: {parity.reason}"
        elif invariance is not None and not invariance.holds(INVARIANCE_TOLERANCE):
            reason = (
                f"nondeterministic: a text's scores change with its batch (max |dp| "
                f"{invariance.max_prob_diff:.2e} > {INVARIANCE_TOLERANCE:.0e}, {invariance.label_flips} of "
                f"{invariance.rows} labels changed)"
            )
        result = CandidateResult(
            spec.name,
            loaded=True,
            passed=reason is None,
            top1_agreement=parity.top1_agreement if texts else None,
            decisive_agreement=parity.decisive_agreement if texts else None,
            max_prob_diff=parity.max_prob_diff if texts else None,
            load_s=first_output_s,
            reason=reason,
            batch_invariance=None if invariance is None else invariance.max_prob_diff,
        )
        if reason is not None:
            log.warning("engine candidate %s rejected: %s", spec.name, reason)
            results.append(result)
            rejected.append((spec.name, reason))
            if candidate is not torch_reference:
                close_quietly(candidate)
            continue
        timed = _time_engine(candidate, batches) if benchmark and len(specs) > 1 else None
        results.append(replace(result, ms_per_batch=timed))
        loaded[spec.name] = (candidate, first_output_s)
        if not benchmark:
            break

    floor = plan.runtime_fallback
    if not loaded:
        # Every candidate failed: PyTorch is the floor (a failed explicit request ends here too).
        if floor.is_reference:
            reference_engine = torch_reference or load_torch_reference()[0]
            loaded[floor.name] = (reference_engine, torch_first_output_s)
        else:
            start = time.perf_counter()
            floor_engine = floor.factory()
            floor_engine.predict(encoder(texts[:1] or ["warm-up"]))
            loaded[floor.name] = (floor_engine, time.perf_counter() - start)
    timings = {r.name: r.ms_per_batch for r in results if r.passed and r.ms_per_batch is not None}
    passing = [s.name for s in specs if s.name in loaded] or [floor.name]
    # min() keeps the first of equals, so untimed candidates (nan -> inf) keep the expected order.
    chosen_name = min(passing, key=lambda n: _finite_or_inf(timings.get(n)))
    chosen, cold_start_s = loaded[chosen_name]
    for other, _ in loaded.values():
        if other is not chosen:
            close_quietly(other)
    if torch_reference is not None and torch_reference is not chosen and reference_spec.name not in loaded:
        close_quietly(torch_reference)

    names = [s.name for s in specs]
    chosen_rank = names.index(chosen_name) if chosen_name in names else len(names)
    reasons: list[str] = []
    fallbacks: list[tuple[str, str, str]] = []
    for name, reason in rejected:
        if name in names and names.index(name) > chosen_rank:
            continue
        reasons.append(f"{name} -> {chosen_name}: {reason}")
        fallbacks.append((name, chosen_name, reason))
        log.warning("engine fallback %s -> %s: %s", name, chosen_name, reason)
        if on_fallback is not None:
            on_fallback(name, chosen_name, reason)

    served: Engine = chosen
    if wrap_fallback and chosen.info.kind == "onnx":
        served = FallbackEngine(chosen, plan.runtime_fallback.factory, on_fallback)
    report = SelectionReport(
        chosen=chosen.info,
        requested=engine,
        device=resolved,
        candidates=tuple(results),
        cold_start_s=cold_start_s,
        selection_s=time.perf_counter() - selection_start,
        fallback_reasons=tuple(reasons),
        reference=source,
    )
    log.info(
        "engine %s selected on %s (cold start %.2fs, selection %.2fs)",
        chosen.info.name,
        resolved,
        report.cold_start_s,
        report.selection_s,
    )
    unsorted: FloatArray | None = None
    if sorted_reference is not None:
        unsorted = np.empty_like(sorted_reference)
        unsorted[order] = sorted_reference
    return Selection(served, report, unsorted, tuple(fallbacks))


def _finite_or_inf(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def warm_up(
    engine: Engine,
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    quantiles: Sequence[float] = (0.1, 0.5, 1.0),
) -> float:
    """Run representative shapes (batch sizes x length quantiles) once before traffic; return seconds.

    The first runs of a shape pay for kernel selection, arena growth and lazy initialisation; doing them
    here keeps that out of the first real batches' latency. On CUDA with a PyTorch engine the peak memory
    of the largest shape is measured and raises the engine's ``bytes_per_token`` if the estimate was low.
    """
    start = time.perf_counter()
    items = sorted(encoder.encode(texts), key=lambda item: item.n_tokens)
    if not items:
        return 0.0
    measure = engine.info.kind == "torch" and engine.info.device.startswith("cuda")
    largest: tuple[int, float] = (0, 0.0)
    for rows in batch_sizes:
        rows = min(rows, len(items))
        for q in quantiles:
            centre = min(len(items) - 1, int(q * (len(items) - 1)))
            lo = max(0, min(centre - rows // 2, len(items) - rows))
            batch = encoder.pad(items[lo : lo + rows])
            if measure:
                largest = max(largest, _measured_run(engine, batch))
            else:
                engine.predict(batch)
    if measure and largest[0] >= 256 and hasattr(engine, "bytes_per_token"):
        measured = int(largest[1] * 1.25)
        if measured > int(getattr(engine, "bytes_per_token", 0)):
            setattr(engine, "bytes_per_token", measured)  # noqa: B010 - not part of the Engine protocol
    return time.perf_counter() - start


def _measured_run(engine: Engine, batch: EncodedBatch) -> tuple[int, float]:
    """Predict and return ``(padded_tokens, peak bytes per padded token)`` on the current CUDA device."""
    import torch

    device = torch.device(engine.info.device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine.predict(batch)
    peak = torch.cuda.max_memory_allocated(device)
    tokens = max(1, batch.padded_tokens)
    return batch.padded_tokens, (peak - before) / tokens
