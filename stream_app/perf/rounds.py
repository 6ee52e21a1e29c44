"""Benchmark rounds into figures that reproduce: medians with their spread, ratios within each round.

A shared machine drifts: the same cell measured twice can differ by a factor of two. The benchmarks
therefore run their targets in alternating rounds (A, B, A, B...) and report, per target, the median
with the minimum and maximum over the rounds; a ratio between two targets is the median of the ratios
*within* each round (each pair measured minutes apart, under about the same load), never the ratio of
two medians or of two single bursts. Plain data in, plain data out: no broker, no clock.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CellSummary",
    "CompareRound",
    "Spread",
    "round_ratios",
    "spread",
    "summarise_compare",
]


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of ``n`` round values with their minimum and maximum (same unit as the values)."""

    median: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def format(self, digits: int = 1, suffix: str = "") -> str:
        """``"363.0 (340.2-380.1)"``; a single round is just its value (``suffix`` follows each number)."""
        med = f"{self.median:.{digits}f}{suffix}"
        if self.n == 1:
            return med
        return f"{med} ({self.min:.{digits}f}{suffix}-{self.max:.{digits}f}{suffix})"


def spread(values: Iterable[float]) -> Spread:
    """Median, min and max of ``values``.

    Raises:
        ValueError: no values, or a value that is NaN or infinite (a round that measured nothing must be
            left out by the caller, not averaged in).
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarise")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite value among {vals}")
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def round_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float | None]:
    """``numerators[i] / denominators[i]`` for each round ``i``; None where the denominator is not positive
    (a round whose reference measured nothing has no ratio).

    Raises:
        ValueError: the sequences differ in length (rounds must pair one to one).
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators for {len(denominators)} denominators")
    return [n / d if d > 0 else None for n, d in zip(numerators, denominators, strict=True)]


@dataclass(frozen=True, slots=True)
class CompareRound:
    """One target's numbers in one round of the worker-versus-baseline comparison.

    ``burst_events_per_s`` is the unpaced burst's throughput (events/s); ``p50_ms``/``p99_ms`` are the paced
    run's end-to-end latency percentiles (ms) at ``paced_rate_per_s``; ``load_1m`` is the machine's 1-minute
    load average read right after the burst; the counts cover the burst and the paced run together.
    """

    corpus: str
    target: str
    round: int
    burst_events_per_s: float
    paced_rate_per_s: float
    p50_ms: float
    p99_ms: float
    load_1m: float
    missing: int = 0
    duplicates: int = 0
    unexpected_dead_letters: int = 0
    cache_hit_rate: float = 0.0


@dataclass(frozen=True)
class CellSummary:
    """One (corpus, target) over its rounds; ``speed_up`` is against the reference target of its corpus."""

    corpus: str
    target: str
    rounds: int
    burst_events_per_s: Spread
    p50_ms: Spread
    p99_ms: Spread
    load_1m: Spread
    paced_rate_per_s: float
    cache_hit_rate: float
    missing: tuple[int, ...]
    duplicates: tuple[int, ...]
    unexpected_dead_letters: tuple[int, ...]
    speed_up: Spread | None = None
    speed_up_rounds: tuple[float | None, ...] = field(default_factory=tuple)

    @property
    def clean(self) -> bool:
        """No round lost a message, duplicated one or dead-lettered a well-formed one."""
        return not any(self.missing) and not any(self.duplicates) and not any(self.unexpected_dead_letters)

    def as_dict(self) -> dict[str, Any]:
        """Everything, spreads as ``{"median", "min", "max", "n"}`` (JSON-ready)."""
        return {**asdict(self), "clean": self.clean}

    def row(self) -> dict[str, Any]:
        """The printed table's row: medians with (min-max) over rounds, counts per round joined by ``/``."""
        return {
            "corpus": self.corpus,
            "target": self.target,
            "rounds": self.rounds,
            "burst events/s": self.burst_events_per_s.format(1),
            "speed-up": self.speed_up.format(1, "x") if self.speed_up is not None else None,
            "paced msg/s": self.paced_rate_per_s,
            "p50 ms": self.p50_ms.format(1),
            "p99 ms": self.p99_ms.format(1),
            "load 1m": self.load_1m.format(2),
            "missing": "/".join(map(str, self.missing)),
            "dup": "/".join(map(str, self.duplicates)),
            "bad dlq": "/".join(map(str, self.unexpected_dead_letters)),
            "hit rate": round(self.cache_hit_rate, 3),
        }


def summarise_compare(rounds: Sequence[CompareRound], reference: str = "baseline") -> list[CellSummary]:
    """Per (corpus, target), in first-seen order: spreads over the rounds, and for every target but the
    reference the speed-up = median (min-max) of its burst throughput over the reference's *in the same
    round* of the same corpus. A round without a reference measurement (or with zero throughput) has no
    ratio; a target with no ratio at all has ``speed_up`` None.

    Raises:
        ValueError: the same (corpus, target, round) appears twice.
    """
    cells: dict[tuple[str, str], dict[int, CompareRound]] = {}
    for r in rounds:
        mine = cells.setdefault((r.corpus, r.target), {})
        if r.round in mine:
            raise ValueError(f"round {r.round} of {r.corpus}/{r.target} given twice")
        mine[r.round] = r
    out: list[CellSummary] = []
    for (corpus, target), by_round in cells.items():
        ordered = [by_round[i] for i in sorted(by_round)]
        ref: Mapping[int, CompareRound] = cells.get((corpus, reference), {}) if target != reference else {}
        ratios: tuple[float | None, ...] = ()
        if ref:
            paired = [r for r in ordered if r.round in ref]
            ratios = tuple(
                round_ratios([r.burst_events_per_s for r in paired], [ref[r.round].burst_events_per_s for r in paired])
            )
        known = [x for x in ratios if x is not None]
        out.append(
            CellSummary(
                corpus=corpus,
                target=target,
                rounds=len(ordered),
                burst_events_per_s=spread(r.burst_events_per_s for r in ordered),
                p50_ms=spread(r.p50_ms for r in ordered),
                p99_ms=spread(r.p99_ms for r in ordered),
                load_1m=spread(r.load_1m for r in ordered),
                paced_rate_per_s=statistics.median(r.paced_rate_per_s for r in ordered),
                cache_hit_rate=statistics.median(r.cache_hit_rate for r in ordered),
                missing=tuple(r.missing for r in ordered),
                duplicates=tuple(r.duplicates for r in ordered),
                unexpected_dead_letters=tuple(r.unexpected_dead_letters for r in ordered),
                speed_up=spread(known) if known else None,
                speed_up_rounds=ratios,
            )
        )
    return out
