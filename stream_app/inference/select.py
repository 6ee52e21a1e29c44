"""Choosing an engine: candidates, the parity gate, timing, fallback and warm-up.

:func:`load_engine` tries the candidates for the device in expected speed order (CPU: ONNX INT8, ONNX
fp32, PyTorch; CUDA: ONNX fp16, PyTorch fp16/bf16, ONNX fp32, PyTorch fp32). Each one must load and agree
with the PyTorch fp32 reference on a fixed text sample (top-1 agreement and largest probability
difference); the passing candidates are timed on that sample and the fastest wins. PyTorch is the floor:
whatever fails, the worker still starts. An ONNX engine is returned inside a :class:`FallbackEngine`, so a
run-time failure switches to PyTorch for good instead of stopping the stream.

``on_fallback(from_engine, to_engine, reason)`` reports every step down. ``reason`` starts with a fixed
code (``load_failed``, ``parity_failed``, ``unsupported``, ``predict_failed``) followed by ``": "`` and
free text, so a metrics label can use the code alone.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_app.errors import DeviceOutOfMemoryError, EngineError, ModelError
from stream_app.inference.base import Engine, EngineInfo, FloatArray
from stream_app.inference.tokenize import EncodedBatch, TextEncoder

__all__ = [
    "BUILTIN_PARITY_TEXTS",
    "CandidateResult",
    "DeviceChoice",
    "EngineChoice",
    "FallbackEngine",
    "GpuDtype",
    "OnFallback",
    "ParityResult",
    "SelectionReport",
    "check_parity",
    "load_engine",
    "resolve_device",
    "warm_up",
]

log = logging.getLogger(__name__)

EngineChoice = Literal["auto", "torch", "onnx", "onnx-int8"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
GpuDtype = Literal["float16", "bfloat16", "float32"]
OnFallback = Callable[[str, str, str], None]

_TIMING_BATCH_ROWS = {"cpu": 32, "cuda": 512}
_TIMING_REPEATS = 3

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


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """What happened to one candidate during selection.

    Attributes:
        name: engine label (``onnx-int8``, ``onnx``, ``torch``, ``torch-fp16``...).
        loaded: it loaded (and, for ONNX, exported) without error.
        passed: it loaded and passed the parity gate.
        top1_agreement: share of parity texts whose top label matches the reference (None if not run).
        decisive_agreement: the gated agreement, near ties excused (see :class:`ParityResult`).
        max_prob_diff: largest absolute probability difference to the reference (None if not run).
        ms_per_batch: median time of one timing batch (None if not timed).
        load_s: seconds to load (including any ONNX export or quantisation on first use).
        reason: why it was rejected, or None.
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


@dataclass(frozen=True, slots=True)
class SelectionReport:
    """The outcome of :func:`load_engine`.

    Attributes:
        chosen: the engine that serves traffic.
        requested: the ``engine`` argument.
        device: the resolved device.
        candidates: every candidate tried, in trial order.
        cold_start_s: from the start of the chosen engine's load to its first prediction.
        selection_s: the whole selection, reference and every candidate included.
        fallback_reasons: one entry per step down, ``"from -> to: reason"``.
    """

    chosen: EngineInfo
    requested: str
    device: str
    candidates: tuple[CandidateResult, ...]
    cold_start_s: float
    selection_s: float
    fallback_reasons: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for logs, the profile report and benchmarks)."""
        data = asdict(self)
        data["chosen"]["name"] = self.chosen.name
        return data


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


def resolve_device(device: DeviceChoice | str) -> str:
    """``auto`` -> ``cuda:0`` when torch sees a GPU, else ``cpu``; ``cuda`` -> ``cuda:0``.

    Raises:
        EngineError: ``cuda`` was asked for and torch sees none.
    """
    if device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda:0" if available else "cpu"
    if not device.startswith("cuda"):
        raise EngineError(f"unknown device {device!r} (auto, cpu or cuda)")
    if not available:
        raise EngineError("device=cuda but torch.cuda.is_available() is False")
    return "cuda:0" if device == "cuda" else device


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


def _plan(
    path: str | Path,
    requested: EngineChoice,
    device: str,
    gpu_dtype: GpuDtype,
    num_threads: int,
    cache_dir: Path | None,
    cpu_spin_wait: bool = False,
) -> _Plan:
    """Candidates in expected speed order, the parity reference, and the run-time fallback."""
    from stream_app.inference.onnx_engine import OnnxEngine
    from stream_app.inference.torch_engine import TorchEngine

    cuda = device.startswith("cuda")

    def onnx(precision: Literal["fp32", "int8", "fp16"]) -> _Spec:
        name = "onnx" if precision == "fp32" else f"onnx-{precision}"
        return _Spec(
            name,
            lambda: OnnxEngine(path, precision, device, num_threads, cache_dir=cache_dir, allow_spinning=cpu_spin_wait),
        )

    reference = _Spec("torch", lambda: TorchEngine(path, device, "float32", num_threads), is_reference=True)
    torch_fast = reference
    if cuda and gpu_dtype != "float32":
        torch_fast = _Spec(_torch_dtype_name(gpu_dtype), lambda: TorchEngine(path, device, gpu_dtype, num_threads))
    unsupported: list[tuple[str, str]] = []
    candidates: list[_Spec]
    if requested == "torch":
        candidates = [torch_fast]
    elif requested == "onnx":
        candidates = [onnx("fp16" if cuda and gpu_dtype == "float16" else "fp32")]
    elif requested == "onnx-int8" and cuda:
        unsupported.append(("onnx-int8", "dynamic INT8 runs on the CPU provider only"))
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
    return _Plan(candidates, reference, torch_fast, unsupported)


def _timing_batches(encoder: TextEncoder, texts: Sequence[str], rows: int) -> list[EncodedBatch]:
    """The parity sample sorted by length, in batches of up to ``rows`` rows: what a busy worker runs.

    32 rows on a CPU; 512 on CUDA, where small batches only time Python's kernel launches (on an H100,
    fp16 and fp32 ran 32-row batches equally fast, while at 16k-token batches fp16 did 2.4x fp32).
    """
    items = sorted(encoder.encode(texts), key=lambda item: item.n_tokens)
    return [encoder.pad(items[i : i + rows]) for i in range(0, len(items), rows)]


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


def _close_quietly(engine: Engine) -> None:
    try:
        engine.close()
    except (EngineError, RuntimeError) as exc:
        log.warning("closing %s failed: %s", engine.info.name, exc)


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
) -> tuple[Engine, SelectionReport]:
    """Load the best engine for ``device`` that passes the parity gate.

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

    Returns:
        The engine and a :class:`SelectionReport`.

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
    if not texts:
        log.warning("engine parity gate disabled: no parity texts")

    reference: Engine | None = None
    reference_probs: FloatArray | None = None
    reference_first_output_s = 0.0

    def get_reference() -> tuple[Engine, FloatArray]:
        nonlocal reference, reference_probs, reference_first_output_s
        if reference is None or reference_probs is None:
            start = time.perf_counter()
            reference = reference_spec.factory()
            reference_probs = _predict_all(reference, batches)
            reference_first_output_s = time.perf_counter() - start
        return reference, reference_probs

    results: list[CandidateResult] = []
    loaded: dict[str, tuple[Engine, float]] = {}  # name -> (engine, seconds from load start to 1st output)
    rejected: list[tuple[str, str]] = [(name, f"unsupported: {why}") for name, why in plan.unsupported]
    for name, why in plan.unsupported:
        results.append(CandidateResult(name, loaded=False, passed=False, reason=f"unsupported: {why}"))

    for spec in specs:
        start = time.perf_counter()
        try:
            if spec.is_reference:
                candidate, probs = get_reference()
            else:
                candidate = spec.factory()
                probs = _predict_all(candidate, batches)
        except (EngineError, ModelError, OSError, RuntimeError, ValueError) as exc:
            if spec.is_reference:
                raise
            reason = f"load_failed: {type(exc).__name__}: {exc}"
            log.warning("engine candidate %s rejected: %s", spec.name, reason)
            results.append(CandidateResult(spec.name, loaded=False, passed=False, reason=reason))
            rejected.append((spec.name, reason))
            continue
        # The reference may have been loaded earlier, for another candidate's parity check.
        first_output_s = reference_first_output_s if spec.is_reference else time.perf_counter() - start
        load_s = first_output_s
        parity = ParityResult(1.0, 0.0, True, None)
        if texts and not spec.is_reference:
            try:
                _, ref_probs = get_reference()
            except (EngineError, ModelError, OSError, RuntimeError, ValueError):
                _close_quietly(candidate)
                raise
            parity = check_parity(
                probs,
                ref_probs,
                min_top1_agreement=min_top1_agreement,
                max_prob_diff=max_prob_diff,
                tie_margin=tie_margin,
            )
        if not parity.passed:
            reason = f"parity_failed: {parity.reason}"
            log.warning("engine candidate %s rejected: %s", spec.name, reason)
            results.append(
                CandidateResult(
                    spec.name,
                    loaded=True,
                    passed=False,
                    top1_agreement=parity.top1_agreement,
                    decisive_agreement=parity.decisive_agreement,
                    max_prob_diff=parity.max_prob_diff,
                    load_s=load_s,
                    reason=reason,
                )
            )
            rejected.append((spec.name, reason))
            if candidate is not reference:
                _close_quietly(candidate)
            continue
        timed = _time_engine(candidate, batches) if benchmark and len(specs) > 1 else None
        results.append(
            CandidateResult(
                spec.name,
                loaded=True,
                passed=True,
                top1_agreement=parity.top1_agreement if texts else None,
                decisive_agreement=parity.decisive_agreement if texts else None,
                max_prob_diff=parity.max_prob_diff if texts else None,
                ms_per_batch=timed,
                load_s=load_s,
            )
        )
        loaded[spec.name] = (candidate, first_output_s)
        if not benchmark:
            break

    floor = plan.runtime_fallback
    if not loaded:
        # Every candidate failed: PyTorch is the floor (a failed explicit request ends here too).
        if floor.is_reference:
            loaded[floor.name] = (get_reference()[0], reference_first_output_s)
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
            _close_quietly(other)
    if reference is not None and reference is not chosen and reference_spec.name not in loaded:
        _close_quietly(reference)

    order = [s.name for s in specs]
    chosen_rank = order.index(chosen_name) if chosen_name in order else len(order)
    reasons: list[str] = []
    for name, reason in rejected:
        if name in order and order.index(name) > chosen_rank:
            continue
        reasons.append(f"{name} -> {chosen_name}: {reason}")
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
    )
    log.info(
        "engine %s selected on %s (cold start %.2fs, selection %.2fs)",
        chosen.info.name,
        resolved,
        report.cold_start_s,
        report.selection_s,
    )
    return served, report


def _finite_or_inf(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


class FallbackEngine:
    """An engine that switches to a fallback, for good, when its primary fails at run time.

    Device out-of-memory is not a failure of the engine (the caller splits the batch), so it passes
    through. Any other error from ``primary.predict`` is logged, reported through ``on_fallback`` with
    reason ``predict_failed: ...``, the fallback is built and the same batch runs again there. An error
    of the fallback itself propagates.
    """

    def __init__(
        self,
        primary: Engine,
        fallback_factory: Callable[[], Engine],
        on_fallback: OnFallback | None = None,
    ) -> None:
        self._current = primary
        self._primary = primary
        self._factory = fallback_factory
        self._on_fallback = on_fallback
        self._lock = threading.Lock()
        self.switched = False
        self.switch_reason: str | None = None

    @property
    def info(self) -> EngineInfo:
        """The info of the engine now serving."""
        return self._current.info

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the engine now serving (the fallback must have the same)."""
        return self._current.labels

    @property
    def bytes_per_token(self) -> int:
        """Forwarded for :func:`~stream_app.inference.base.memory_token_budget`."""
        return int(getattr(self._current, "bytes_per_token", 0))

    @bytes_per_token.setter
    def bytes_per_token(self, value: int) -> None:
        if hasattr(self._current, "bytes_per_token"):
            setattr(self._current, "bytes_per_token", value)  # noqa: B010 - not every Engine has it

    @property
    def current(self) -> Engine:
        """The engine now serving."""
        return self._current

    def predict(self, batch: EncodedBatch) -> FloatArray:
        """Predict on the primary; on failure switch to the fallback and predict there."""
        engine = self._current
        try:
            return engine.predict(batch)
        except DeviceOutOfMemoryError:
            raise
        # Broad on purpose: any failure of the primary (ORT, a bug, a bad kernel) must not stop the
        # stream while the fallback can serve; the error is logged and reported, not swallowed.
        except Exception as exc:
            if engine is not self._primary:
                raise
            self._switch(engine, f"predict_failed: {type(exc).__name__}: {exc}")
        return self._current.predict(batch)

    def _switch(self, failed: Engine, reason: str) -> None:
        with self._lock:
            if self._current is not failed:  # another thread already switched
                return
            log.error("engine %s failed at run time, switching to its fallback: %s", failed.info.name, reason)
            try:
                fallback = self._factory()
            except (EngineError, ModelError, OSError, RuntimeError) as exc:
                raise EngineError(f"fallback engine failed to load after {reason}: {exc}") from exc
            if fallback.labels != failed.labels:
                _close_quietly(fallback)
                raise EngineError(f"fallback labels {fallback.labels} != primary labels {failed.labels}")
            self._current = fallback
            self.switched = True
            self.switch_reason = reason
            _close_quietly(failed)
        if self._on_fallback is not None:
            self._on_fallback(failed.info.name, fallback.info.name, reason)

    def close(self) -> None:
        """Close whichever engine serves now (the primary is closed at a switch)."""
        _close_quietly(self._current)


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
