"""The bottleneck report of a recorded run (the samples come from :mod:`stream_app.sampler`).

:func:`build_profile`, which turns a recorded run (stage_metrics.v1 records, emotion events or their
  ``timings_ms``, resource samples, and optionally the replay report) into a :class:`Profile`: a
  per-stage time breakdown, the share of end-to-end latency per stage, the device busy share, batch
  fill and padding waste, and a named bottleneck with recommendations; ``render_markdown``,
  ``render_json`` and ``render_png`` present it.

How the numbers are derived:

* per batch (from stage metrics): ``queue_wait`` (oldest message's wait for its batch), ``tokenize``,
  ``infer``, ``postprocess``, ``produce`` (until the broker acknowledged the batch's outputs);
* per message (from events' ``timings_ms``): ``decode``, ``cache``, ``queue_wait``, ``tokenize``,
  ``infer``, ``postprocess`` and the worker's ``total``; the share of end-to-end latency uses the mean
  message: each stage's mean over all events (a cache hit contributes zero to the batch stages) and
  ``worker_other`` = mean total minus those stages (time in the intake queue and the ordered emitter).
  The time outside the worker is measured from the replay's per-message clocks (one machine):
  ``topic_wait`` = the worker's ``received_at`` minus the produce call (the chat side's produce hop,
  the time in the input topic, the worker's fetch), and ``produce`` = end-to-end minus ``topic_wait``
  minus the worker's total (the event's produce and acknowledgement, the consumer's fetch). Without
  the replay's clocks ``produce`` comes from the batches (size-weighted, scaled by the share of
  inferred events) and ``topic_wait`` is the remainder of the end-to-end mean, or 0 without one;
* device busy share = sum of batch ``infer`` time / wall time of the run (the replay's first send to
  its last event, else the span of the stage records' ``emitted_at``);
* padding waste = 1 - real tokens / padded tokens over all batches; batch fill = mean batch size /
  ``max_batch_size`` (when known) and mean padded tokens / mean token budget.

Bottleneck rules (thresholds are the module constants below; the first matching rule names the
bottleneck, every matching rule adds a recommendation with its numbers):

1. ``infer`` when device busy >= ``BUSY_SATURATED`` (0.80): the engine is the limit, and queue wait
   is its symptom. Recommend a faster engine (onnx-int8, unless the stage records show it already
   runs), more workers/partitions, or a GPU (when on a CPU).
2. ``queue_wait`` when its latency share >= ``QUEUE_SHARE_HIGH`` (0.40) while device busy <
   ``BUSY_IDLE`` (0.60): batches are held while the device idles. If most batches close by age,
   recommend lowering ``max_wait_ms``; if they close on the token/size cap, raising the token budget.
3. otherwise the stage with the largest latency share names the bottleneck (``topic_wait``,
   ``produce``, ``tokenize``, ``infer``, ``worker_other``, ...).

Recommendation rules (independent of which stage is named):

* padding waste >= ``PADDING_WASTE_HIGH`` (0.30): enable ``group_by_length`` / lower ``max_length_tokens``;
* ``produce`` share >= ``PRODUCE_SHARE_HIGH`` (0.25) or produce is the largest stage: raise
  ``producer_linger_ms`` (fewer, fuller requests) or use ``producer_acks=1`` where durability allows;
* ``tokenize`` share >= ``TOKENIZE_SHARE_HIGH`` (0.20): tokenisation runs on one thread, add workers;
* ``worker_other`` share >= ``OTHER_SHARE_HIGH`` (0.30): time in the worker outside every measured
  stage: waiting in the intake queue for the tokenizer, or in the ordered emitter behind an older
  message of the same partition (length grouping reorders a partition's messages across batches);
* ``topic_wait`` share >= ``TOPIC_WAIT_SHARE_HIGH`` (0.40): with a consumer lag of more than
  ``LAG_BEHIND_S`` (1 s) of throughput at some point, messages queue in the input topic because the
  consumer is behind (more workers, a faster engine); otherwise the Kafka hops themselves dominate
  (fetch wait, linger on the producing side, broker load), not the model;
* the device busy < ``BUSY_LOW`` (0.25) with mean batch fill < ``FILL_LOW`` (0.25): the worker is
  under-loaded (latency is at its floor; the offered rate, not the worker, bounds throughput);
* device busy >= ``BUSY_SATURATED`` and the largest quarter of batches (at least twice the size of the
  smaller half) cost at least ``BATCH_GAIN_MIN`` (30 %) less inference time per message: the token
  budget keeps batches smaller than the saturated engine would like; raise ``target_batch_p99_ms``
  or ``min_batch_tokens`` (adaptive budget) or ``max_batch_tokens``;
* lag at the end of the replay > ``LAG_LEFT`` (0) and rising: the offered rate was above capacity;
* process CPU mean >= ``CPU_SATURATED`` (0.90) of the cores: the host CPU is the limit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_app.records import parse_rfc3339
from stream_app.sampler import ResourceSample

__all__ = [
    "BATCH_GAIN_MIN",
    "BATCH_STAGES",
    "BUSY_IDLE",
    "BUSY_LOW",
    "BUSY_SATURATED",
    "CPU_SATURATED",
    "FILL_LOW",
    "LAG_BEHIND_S",
    "LAG_LEFT",
    "MESSAGE_STAGES",
    "OTHER_SHARE_HIGH",
    "PADDING_WASTE_HIGH",
    "PRODUCE_SHARE_HIGH",
    "QUEUE_SHARE_HIGH",
    "SHARE_STAGES",
    "TOKENIZE_SHARE_HIGH",
    "TOPIC_WAIT_SHARE_HIGH",
    "Profile",
    "build_profile",
    "profile_replay",
    "render_json",
    "render_markdown",
    "render_png",
    "write_profile",
]

BUSY_SATURATED = 0.80
BUSY_IDLE = 0.60
BUSY_LOW = 0.25
QUEUE_SHARE_HIGH = 0.40
PADDING_WASTE_HIGH = 0.30
PRODUCE_SHARE_HIGH = 0.25
TOKENIZE_SHARE_HIGH = 0.20
LAG_BEHIND_S = 1.0
TOPIC_WAIT_SHARE_HIGH = 0.40
OTHER_SHARE_HIGH = 0.30
BATCH_GAIN_MIN = 0.30
FILL_LOW = 0.25
LAG_LEFT = 0
CPU_SATURATED = 0.90

BATCH_STAGES = ("queue_wait", "tokenize", "infer", "postprocess", "produce")
MESSAGE_STAGES = ("decode", "cache", "queue_wait", "tokenize", "infer", "postprocess")
SHARE_STAGES = ("topic_wait", *MESSAGE_STAGES, "worker_other", "produce")


# ------------------------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """What :func:`build_profile` found; every field is plain data (JSON-ready)."""

    batches: int = 0
    events: int = 0
    wall_s: float = 0.0
    per_batch_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    per_message_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_share: dict[str, float] = field(default_factory=dict)
    mean_stage_ms: dict[str, float] = field(default_factory=dict)
    end_to_end_ms: dict[str, float] = field(default_factory=dict)
    device_busy: float = 0.0
    batch_fill: dict[str, float] = field(default_factory=dict)
    closed_reasons: dict[str, int] = field(default_factory=dict)
    engine: str = ""
    device: str = ""
    batch_efficiency: dict[str, float] = field(default_factory=dict)
    cache_levels: dict[str, int] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    bottleneck: str = "none"
    bottleneck_reason: str = ""
    recommendations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "total": 0.0, "n": 0}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(arr.max()),
        "total": float(arr.sum()),
        "n": int(arr.size),
    }


def _level(event: Mapping[str, Any]) -> str:
    cache = event.get("cache")
    if isinstance(cache, Mapping):
        return str(cache.get("level", "none"))
    return str(event.get("level") or "none")


def _sample_dict(sample: ResourceSample | Mapping[str, Any]) -> dict[str, Any]:
    return asdict(sample) if isinstance(sample, ResourceSample) else dict(sample)


def build_profile(
    stage_records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    samples: Iterable[ResourceSample | Mapping[str, Any]] = (),
    replay_report: Any = None,
    *,
    max_batch_size: int | None = None,
) -> Profile:
    """Turn a recorded run into a :class:`Profile` (see the module docstring for every rule).

    Args:
        stage_records: stage_metrics.v1 documents (one per batch).
        events: emotion_event.v1 documents, or the replay's compact samples (``timings_ms``, ``level``,
            ``e2e_ms``).
        samples: :class:`ResourceSample` or their dicts (``cpu_percent``, ``rss_bytes``, ``cpu_count``...).
        replay_report: a :class:`~stream_app.perf.replay.ReplayReport` (or its dict), for the wall time,
            end-to-end latency and lag; optional.
        max_batch_size: the configured batch size cap, for the fill ratio; optional.
    """
    rep: Mapping[str, Any] = {}
    if replay_report is not None:
        rep = replay_report if isinstance(replay_report, Mapping) else replay_report.to_dict()
    prof = Profile(batches=len(stage_records), events=len(events))

    # per batch
    for stage in BATCH_STAGES:
        prof.per_batch_ms[stage] = _stats([float(r["stage_ms"][stage]) for r in stage_records])
    # per message
    timings = [e.get("timings_ms") or {} for e in events]
    for stage in (*MESSAGE_STAGES, "total"):
        prof.per_message_ms[stage] = _stats([float(t.get(stage, 0.0)) for t in timings])
    levels = Counter(_level(e) for e in events)
    prof.cache_levels = dict(levels)

    # wall time and device busy
    if rep.get("duration_s"):
        prof.wall_s = float(rep["duration_s"])
    else:
        stamps = [t for t in (parse_rfc3339(r.get("emitted_at")) for r in stage_records) if t is not None]
        first_infer = prof.per_batch_ms["infer"]["max"] / 1e3
        prof.wall_s = (max(stamps) - min(stamps) + first_infer) if len(stamps) > 1 else 0.0
    infer_total_s = prof.per_batch_ms["infer"]["total"] / 1e3
    if not stage_records and events:
        # no batches (the naive baseline): each inferred message ran its own forward pass, so the busy
        # time is the mean per-message infer time times the number of inferred messages
        inferred = [float(t.get("infer", 0.0)) for e, t in zip(events, timings, strict=True) if _level(e) == "none"]
        n_inferred = int((rep.get("cache_levels") or {}).get("none", len(inferred)))
        infer_total_s = (float(np.mean(inferred)) if inferred else 0.0) * n_inferred / 1e3
        prof.notes.append("no stage metrics: device busy estimated from the events' per-message infer time")
    prof.device_busy = min(1.0, infer_total_s / prof.wall_s) if prof.wall_s > 0 else 0.0

    # batch fill and padding
    if stage_records:
        sizes = [float(r["size"]) for r in stage_records]
        real = sum(float(r["real_tokens"]) for r in stage_records)
        padded = sum(float(r["padded_tokens"]) for r in stage_records)
        budgets = [float(r["token_budget"]) for r in stage_records]
        fill = {
            "mean_size": float(np.mean(sizes)),
            "max_size_seen": max(sizes),
            "mean_real_tokens": real / len(stage_records),
            "mean_padded_tokens": padded / len(stage_records),
            "padding_waste": 1.0 - real / padded if padded else 0.0,
            "mean_token_budget": float(np.mean(budgets)),
            "token_fill": (padded / len(stage_records)) / float(np.mean(budgets)) if budgets else 0.0,
        }
        if max_batch_size:
            fill["max_batch_size"] = float(max_batch_size)
            fill["size_fill"] = fill["mean_size"] / max_batch_size
        prof.batch_fill = fill
        prof.closed_reasons = dict(Counter(str(r.get("closed_reason")) for r in stage_records))
        prof.engine = Counter(str(r.get("engine", "")) for r in stage_records).most_common(1)[0][0]
        prof.device = Counter(str(r.get("device", "")) for r in stage_records).most_common(1)[0][0]
        prof.batch_efficiency = _batch_efficiency(stage_records)

    # latency shares of the mean message
    means = {s: prof.per_message_ms[s]["mean"] for s in MESSAGE_STAGES}
    inferred_share = (levels.get("none", 0) + levels.get("batch", 0)) / len(events) if events else 1.0
    if stage_records:
        weights = [max(1.0, float(r["size"])) for r in stage_records]
        produce_ms = float(np.average([float(r["stage_ms"]["produce"]) for r in stage_records], weights=weights))
        batch_produce = produce_ms * inferred_share
    else:
        batch_produce = 0.0
    total_ms = prof.per_message_ms["total"]["mean"]
    means["worker_other"] = max(0.0, total_ms - sum(means[s] for s in MESSAGE_STAGES))
    e2e = [float(e["e2e_ms"]) for e in events if e.get("e2e_ms") is not None]
    to_worker = [float(e["to_worker_ms"]) for e in events if e.get("to_worker_ms") is not None]
    if not e2e and rep.get("latency_ms", {}).get("mean"):
        e2e_mean = float(rep["latency_ms"]["mean"])
    else:
        e2e_mean = float(np.mean(e2e)) if e2e else 0.0
    if e2e_mean > 0 and to_worker:
        means["topic_wait"] = float(np.mean(to_worker))
        means["produce"] = max(0.0, e2e_mean - means["topic_wait"] - total_ms)
    elif e2e_mean > 0:
        means["produce"] = batch_produce
        means["topic_wait"] = max(0.0, e2e_mean - total_ms - batch_produce)
        prof.notes.append("no per-message read time: topic_wait is the rest of the end-to-end mean")
    else:
        means["produce"], means["topic_wait"] = batch_produce, 0.0
        prof.notes.append("no end-to-end latency recorded: shares are of the worker's time plus produce")
    denominator = sum(means[s] for s in SHARE_STAGES)
    if e2e_mean > 0:
        prof.end_to_end_ms = _stats(e2e) if e2e else dict(rep.get("latency_ms", {}))
    prof.mean_stage_ms = means
    prof.latency_share = {s: (means[s] / denominator if denominator > 0 else 0.0) for s in SHARE_STAGES}

    # resources
    rows = [_sample_dict(s) for s in samples]
    if rows:
        cpu = [float(r.get("cpu_percent", 0.0)) for r in rows]
        rss = [float(r.get("rss_bytes", 0.0)) for r in rows]
        cores = float(rows[-1].get("cpu_count") or os.cpu_count() or 1)
        prof.resources = {
            "samples": float(len(rows)),
            "cpu_percent_mean": float(np.mean(cpu)),
            "cpu_percent_max": max(cpu),
            "cpu_count": cores,
            "rss_mb_first": rss[0] / 2**20,
            "rss_mb_max": max(rss) / 2**20,
            "rss_mb_last": rss[-1] / 2**20,
        }
        gpu = [float(r["gpu_utilization_percent"]) for r in rows if r.get("gpu_utilization_percent") is not None]
        if gpu:
            prof.resources["gpu_utilization_mean"] = float(np.mean(gpu))
            prof.resources["gpu_utilization_max"] = max(gpu)
            mem = [float(r["gpu_memory_used_bytes"]) for r in rows if r.get("gpu_memory_used_bytes") is not None]
            if mem:
                prof.resources["gpu_memory_mb_max"] = max(mem) / 2**20
    if rep:
        prof.replay = {
            k: rep.get(k)
            for k in ("sent", "unique_events", "missing", "duplicate_events", "throughput_events_per_s",
                      "steady_throughput_events_per_s", "offered_rate_per_s", "cache_hit_rate", "max_lag",
                      "final_lag")
        }  # fmt: skip
    _diagnose(prof, rep)
    return prof


def profile_replay(report: Any) -> Profile:
    """:func:`build_profile` of a replay's report (a :class:`~stream_app.perf.replay.ReplayReport`): its stage
    records, event samples, resource samples and the batch size cap it ran with."""
    return build_profile(
        report.stage_records,
        report.event_samples,
        report.resource_samples,
        report,
        max_batch_size=report.run.get("max_batch_size"),
    )


def _batch_efficiency(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Inference ms per message of the smaller half of batches (by size) against the largest quarter."""
    ordered = sorted(records, key=lambda r: float(r["size"]))
    if len(ordered) < 8:
        return {}
    small, large = ordered[: len(ordered) // 2], ordered[-max(1, len(ordered) // 4) :]

    def per_message(rows: Sequence[Mapping[str, Any]]) -> float:
        size = sum(float(r["size"]) for r in rows)
        return sum(float(r["stage_ms"]["infer"]) for r in rows) / size if size else 0.0

    return {
        "small_mean_size": float(np.mean([float(r["size"]) for r in small])),
        "small_infer_ms_per_message": per_message(small),
        "large_mean_size": float(np.mean([float(r["size"]) for r in large])),
        "large_infer_ms_per_message": per_message(large),
    }


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _diagnose(prof: Profile, rep: Mapping[str, Any]) -> None:
    share = prof.latency_share
    busy = prof.device_busy
    recs = prof.recommendations
    if not prof.events and not prof.batches:
        prof.bottleneck, prof.bottleneck_reason = "none", "no events and no batches were recorded"
        return
    reasons = prof.closed_reasons
    n_closed = sum(reasons.values()) or 1
    age_closed = reasons.get("age", 0) / n_closed
    cap_closed = (reasons.get("tokens", 0) + reasons.get("size", 0)) / n_closed
    largest = max(SHARE_STAGES, key=lambda s: share.get(s, 0.0))

    if busy >= BUSY_SATURATED:
        prof.bottleneck = "infer"
        prof.bottleneck_reason = (
            f"the device is busy {_pct(busy)} of the wall time (>= {_pct(BUSY_SATURATED)}): the engine is the limit"
        )
    elif share.get("queue_wait", 0.0) >= QUEUE_SHARE_HIGH and busy < BUSY_IDLE:
        prof.bottleneck = "queue_wait"
        prof.bottleneck_reason = (
            f"queue wait is {_pct(share['queue_wait'])} of latency at {_pct(busy)} device busy: "
            "batches are held while the device idles"
        )
    else:
        prof.bottleneck = largest
        prof.bottleneck_reason = f"{largest} is the largest share of latency ({_pct(share.get(largest, 0.0))})"

    if busy >= BUSY_SATURATED:
        options = [] if prof.engine.endswith("int8") else ["use onnx-int8 (EMOTION_STREAM_MODEL__ENGINE)"]
        options.append("more workers (and input partitions)")
        if not prof.device.startswith("cuda"):
            options.append("a GPU")
        engine = f" ({prof.engine} on {prof.device})" if prof.engine else ""
        recs.append(f"infer is {_pct(busy)} busy{engine}: the engine is the limit: " + ", ".join(options))
        eff = prof.batch_efficiency
        if (
            eff
            and eff["large_mean_size"] >= 2 * eff["small_mean_size"]
            and eff["large_infer_ms_per_message"] <= (1 - BATCH_GAIN_MIN) * eff["small_infer_ms_per_message"]
        ):
            gain = 1 - eff["large_infer_ms_per_message"] / eff["small_infer_ms_per_message"]
            recs.append(
                f"batches of ~{eff['large_mean_size']:.0f} cost {eff['large_infer_ms_per_message']:.1f} ms per message "
                f"against {eff['small_infer_ms_per_message']:.1f} ms at ~{eff['small_mean_size']:.0f} ({_pct(gain)} "
                f"less) while the engine is saturated and the token budget averages "
                f"{prof.batch_fill.get('mean_token_budget', 0):.0f}: raise target_batch_p99_ms or min_batch_tokens "
                "(adaptive budget) or max_batch_tokens"
            )
    if share.get("queue_wait", 0.0) >= QUEUE_SHARE_HIGH and busy < BUSY_IDLE:
        if age_closed >= 0.5 or cap_closed == 0:
            recs.append(
                f"queue wait is {_pct(share['queue_wait'])} of latency at {_pct(busy)} device busy and "
                f"{_pct(age_closed)} of batches close on age: lower max_wait_ms"
            )
        if cap_closed > 0:
            recs.append(
                f"queue wait is {_pct(share['queue_wait'])} of latency at {_pct(busy)} device busy and "
                f"{_pct(cap_closed)} of batches close on the token/size cap: raise max_batch_tokens "
                "(or max_batch_size)"
            )
    waste = prof.batch_fill.get("padding_waste", 0.0)
    if waste >= PADDING_WASTE_HIGH:
        recs.append(f"padding waste {_pct(waste)}: enable group_by_length (check it is on) or lower max_length_tokens")
    produce_share = share.get("produce", 0.0)
    if produce_share >= PRODUCE_SHARE_HIGH or (largest == "produce" and produce_share > 0):
        recs.append(
            f"produce is {_pct(produce_share)} of latency ({prof.per_batch_ms['produce']['mean']:.1f} ms per batch): "
            "raise producer_linger_ms to pack more events per request, or producer_acks=1 where durability allows"
        )
    if share.get("tokenize", 0.0) >= TOKENIZE_SHARE_HIGH:
        recs.append(f"tokenize is {_pct(share['tokenize'])} of latency: it runs on one thread per worker; add workers")
    if share.get("worker_other", 0.0) >= OTHER_SHARE_HIGH:
        recs.append(
            f"{_pct(share['worker_other'])} of latency is in the worker outside every measured stage "
            f"({prof.mean_stage_ms['worker_other']:.0f} ms): messages wait for the tokenizer or, in the ordered "
            "emitter, for an older message of their partition that length grouping put in a later batch; "
            "try group_by_length=false or a smaller max_batch_size and compare"
        )
    if share.get("topic_wait", 0.0) >= TOPIC_WAIT_SHARE_HIGH:
        wait_ms = prof.mean_stage_ms["topic_wait"]
        rate = float(rep.get("throughput_events_per_s") or 0.0)
        max_lag = float(rep.get("max_lag") or 0.0)
        if rate > 0 and max_lag > LAG_BEHIND_S * rate:
            recs.append(
                f"messages take {wait_ms:.0f} ms ({_pct(share['topic_wait'])} of latency) to reach the worker, with a "
                f"consumer lag up to {max_lag:.0f} ({max_lag / rate:.1f} s of throughput): the consumer is behind "
                "the offered rate; raise its throughput (more workers and partitions, a faster engine) or offer less"
            )
        else:
            recs.append(
                f"messages take {wait_ms:.0f} ms ({_pct(share['topic_wait'])} of latency) to reach the worker while "
                "it keeps up: the Kafka hops dominate; check the consumer's fetch wait, linger on the producing "
                "side and broker load before tuning the model"
            )
    fill = prof.batch_fill.get("size_fill", prof.batch_fill.get("token_fill", 1.0))
    if busy < BUSY_LOW and fill < FILL_LOW:
        recs.append(
            f"the device is busy {_pct(busy)} with batches {_pct(fill)} full: the worker is under-loaded; "
            "latency is at its floor and the offered rate bounds throughput"
        )
    lag = rep.get("lag_samples") or []
    final = rep.get("final_lag")
    if final is not None and final > LAG_LEFT and len(lag) >= 2 and lag[-1][1] >= lag[len(lag) // 2][1]:
        recs.append(
            f"consumer lag was {final} at the end and not falling: the offered rate is above capacity "
            "(add workers or a faster engine)"
        )
    res = prof.resources
    if res and res["cpu_percent_mean"] >= CPU_SATURATED * 100 * res["cpu_count"]:
        recs.append(
            f"the process uses {res['cpu_percent_mean']:.0f}% CPU of {res['cpu_count']:.0f} cores: the host CPU is "
            "the limit; more cores or a GPU"
        )
    if not recs:
        recs.append("no stage crosses a threshold: nothing to tune at this load")


# -------------------------------------------------------------------------------------------- render
def render_json(profile: Profile) -> str:
    return json.dumps(profile.to_dict(), indent=2, sort_keys=False)


def render_markdown(profile: Profile, title: str = "Profile") -> str:
    p = profile
    lines = [f"# {title}", ""]
    lines += [f"**Bottleneck: {p.bottleneck}** - {p.bottleneck_reason}.", ""]
    lines += ["Recommendations:", "", *[f"- {r}" for r in p.recommendations], ""]
    lines += [
        f"{p.events} events, {p.batches} batches, wall {p.wall_s:.1f} s, device busy {_pct(p.device_busy)}.",
        "",
        "## Share of end-to-end latency (mean message)",
        "",
        "| stage | mean ms | share |",
        "|---|---:|---:|",
    ]
    for stage in SHARE_STAGES:
        lines.append(f"| {stage} | {p.mean_stage_ms.get(stage, 0.0):.2f} | {_pct(p.latency_share.get(stage, 0.0))} |")
    if p.end_to_end_ms:
        e = p.end_to_end_ms
        lines += ["", f"End-to-end ms: p50 {e.get('p50', 0):.1f}, p95 {e.get('p95', 0):.1f}, "
                      f"p99 {e.get('p99', 0):.1f}, max {e.get('max', 0):.1f}."]  # fmt: skip
    lines += ["", "## Per batch (stage_metrics.v1)", ""]
    if not p.batches:
        lines.append("No stage metrics were recorded (the naive baseline emits none).")
    else:
        lines += ["| stage | mean ms | p50 | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]
    for stage, s in p.per_batch_ms.items() if p.batches else ():
        lines.append(
            f"| {stage} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['max']:.2f} |"
        )
    lines += ["", "## Per message (emotion_event.v1 timings_ms)", "", "| stage | mean ms | p50 | p95 | p99 |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for stage, s in p.per_message_ms.items():
        lines.append(f"| {stage} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} |")
    if p.batch_fill:
        lines += ["", "## Batches", ""]
        lines += [f"- {k}: {v:.3g}" for k, v in p.batch_fill.items()]
        lines.append(f"- closed by: {', '.join(f'{k} {v}' for k, v in sorted(p.closed_reasons.items()))}")
    if p.cache_levels:
        lines += ["", "Cache levels: " + ", ".join(f"{k} {v}" for k, v in sorted(p.cache_levels.items())) + "."]
    if p.resources:
        lines += ["", "## Resources", ""] + [f"- {k}: {v:.4g}" for k, v in p.resources.items()]
    if p.replay:
        lines += ["", "## Replay", ""] + [f"- {k}: {v}" for k, v in p.replay.items()]
    if p.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in p.notes]
    return "\n".join(lines) + "\n"


def render_png(profile: Profile, path: str | Path) -> Path:
    """Latency shares, per-batch stage times and batch fill in one figure (matplotlib, no display)."""
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_share, ax_batch, ax_fill = fig.subplots(1, 3)
    stages = list(SHARE_STAGES)
    ax_share.barh(stages, [profile.mean_stage_ms.get(s, 0.0) for s in stages], color="tab:blue")
    for i, s in enumerate(stages):
        ax_share.text(profile.mean_stage_ms.get(s, 0.0), i, f" {_pct(profile.latency_share.get(s, 0.0))}",
                      va="center", fontsize=8)  # fmt: skip
    ax_share.invert_yaxis()
    ax_share.set_xlabel("mean ms per message")
    ax_share.set_title(f"bottleneck: {profile.bottleneck}")
    bstages = list(profile.per_batch_ms) if profile.batches else []
    if not bstages:
        ax_batch.text(0.5, 0.5, "no stage metrics", ha="center", transform=ax_batch.transAxes)
    ax_batch.bar(bstages, [profile.per_batch_ms[s]["mean"] for s in bstages], label="mean")
    ax_batch.plot(bstages, [profile.per_batch_ms[s]["p95"] for s in bstages], "k_", markersize=18, label="p95")
    ax_batch.set_ylabel("ms per batch")
    ax_batch.set_title(f"per batch; device busy {_pct(profile.device_busy)}")
    ax_batch.tick_params(axis="x", rotation=30)
    if bstages:
        ax_batch.legend()
    fill = profile.batch_fill
    if fill:
        ax_fill.bar(["real", "padded", "budget"],
                    [fill["mean_real_tokens"], fill["mean_padded_tokens"], fill["mean_token_budget"]],
                    color=["tab:green", "tab:orange", "tab:gray"])  # fmt: skip
        ax_fill.set_title(f"tokens per batch; padding waste {_pct(fill['padding_waste'])}")
    else:
        ax_fill.text(0.5, 0.5, "no stage metrics", ha="center", transform=ax_fill.transAxes)
    fig.savefig(out, dpi=100)
    return out


def write_profile(profile: Profile, path_prefix: str | Path, title: str = "Profile") -> list[Path]:
    """Write ``<prefix>.md``, ``<prefix>.json`` and ``<prefix>.png``."""
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_name(prefix.name + ".md")
    js = prefix.with_name(prefix.name + ".json")
    md.write_text(render_markdown(profile, title), encoding="utf-8")
    js.write_text(render_json(profile), encoding="utf-8")
    return [md, js, render_png(profile, prefix.with_name(prefix.name + ".png"))]
