"""Replay benchmark: the worker against the naive baseline, latency versus load, stress, profiler overhead.

One local Apache Kafka serves every mode; each cell gets fresh topics, a fresh consumer group and a fresh
worker (or baseline) process, warmed up with throw-away messages before anything is measured.

Modes (``--modes``, comma-separated; all by default):

* ``compare``: worker and baseline on the same corpora, unique texts and 50 % repeats (Zipf), in
  ``--rounds`` alternating rounds per corpus (baseline, worker, baseline, worker...), every cell a fresh
  process on fresh topics and group, warmed up. Per cell an unpaced burst (throughput) and a paced run
  (latency at a load both can carry: ``--paced-rate``, by default half the corpus's first baseline burst),
  on disjoint halves of the dev split so the burst does not warm the paced run's cache. Reported per
  target: the median (min-max) over rounds of burst events/s, paced p50 and p99, and the 1-minute load
  average read after each burst; the speed-up is the median (min-max) of the per-round worker/baseline
  ratios; missing, duplicated and wrongly dead-lettered messages per round. ``--with-torch`` adds the worker
  forced onto the baseline's engine (PyTorch fp32, unique texts), off by default as it lengthens the run by
  a quarter. Every round's raw numbers go to the JSON.
* ``sweep``: one worker with caches off; an unpaced burst finds saturation, then 25/50/75/100/125 % of it.
* ``stress``: one worker, 100, 1,000 and 10,000 simulated conversations, each an unpaced burst from many
  concurrent producer tasks; checks the worker stays up, RSS stays bounded and the lag drains.
* ``overhead``: the resource sampler's cost: inference throughput in this process with the sampler off,
  at its default 1 s interval and at 50 ms; and, when the worker has the sampler wired, worker throughput
  with it at 1 s versus effectively off.

Usage: ``.venv/bin/python benchmarks/replay.py [--modes compare,sweep] [--messages 1000] [--rounds 3]``.
Results: ``benchmarks/results/replay-<mode>-<time>.json`` and ``.png``; the worker's full reports of the
50 %-repeat comparison (its last round) are written too, with their ``profile-*`` reports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_app.devtools.kafka_local import local_kafka
from stream_app.devtools.processes import exit_on_sigterm
from stream_app.perf.commands import (
    RunningTarget,
    plot_sweep,
    print_table,
    replay_target,
    running_target,
    sweep,
    warm_up,
)
from stream_app.perf.profile import profile_replay, write_profile
from stream_app.perf.replay import ReplayReport, build_corpus, load_texts, write_report
from stream_app.perf.rounds import CellSummary, CompareRound, Spread, summarise_compare
from stream_app.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_ENV = {"EMOTION_STREAM_MODEL__NUM_THREADS": "0"}
CACHE_OFF = {"EMOTION_STREAM_CACHE__L1_ENABLED": "false", "EMOTION_STREAM_CACHE__L2_ENABLED": "false"}


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))


class Bench:
    def __init__(self, settings: Settings, out_dir: Path, stamp: str, progress: bool) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.stamp = stamp
        self.progress = progress
        self.tmp = Path(tempfile.mkdtemp(prefix="emotion-bench-"))
        texts = load_texts("dev", settings.data.goemotions_dir)
        random.Random(0).shuffle(texts)
        half = len(texts) // 2
        self.burst_texts, self.paced_texts = texts[:half], texts[half:]
        self.all_texts = texts

    def target(
        self, stack: ExitStack, kind: Literal["worker", "baseline"], name: str, env: dict[str, str] | None = None
    ) -> RunningTarget:
        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        target = stack.enter_context(
            running_target(kind, self.settings, self.tmp / tag, tag=tag, env={**BENCH_ENV, **(env or {})})
        )
        ready_s = target.wait_ready()
        warm_up(target)
        click.echo(f"{kind} {name}: ready in {ready_s:.0f}s, warmed up (log {target.log_path})", err=True)
        return target

    # ------------------------------------------------------------------------------------ compare
    def compare(
        self, messages: int, paced_seconds: float, rounds: int, paced_rate: float | None, with_torch: bool
    ) -> dict[str, Any]:
        records: list[CompareRound] = []
        detail: list[dict[str, Any]] = []
        rates: dict[str, float] = {}
        for corpus, repeat in (("unique", 0.0), ("repeat50", 0.5)):
            cells: list[tuple[str, Literal["baseline", "worker"], dict[str, str]]] = [
                ("baseline", "baseline", {}),
                ("worker", "worker", {}),
            ]
            if with_torch and corpus == "unique":
                # the same worker on the baseline's engine: separates batching from the faster engine
                cells.append(("worker-torch", "worker", {"EMOTION_STREAM_MODEL__ENGINE": "torch"}))
            rate = paced_rate
            # baseline, worker, baseline, worker...: the baseline leads so that, without --paced-rate, its
            # first burst sets the paced rate every later cell of the corpus is offered
            for rnd in range(rounds):
                for label, kind, env in cells:
                    rec, doc = self._compare_cell(corpus, repeat, label, kind, env, rnd, rounds, messages,
                                                  paced_seconds, rate)  # fmt: skip
                    rate = rec.paced_rate_per_s
                    records.append(rec)
                    detail.append(doc)
                    click.echo(
                        f"{corpus} round {rnd + 1}/{rounds} {label}: burst {rec.burst_events_per_s:.1f} events/s, "
                        f"paced {rate}/s p50 {rec.p50_ms:.1f} p99 {rec.p99_ms:.1f} ms, load {rec.load_1m:.2f}, "
                        f"missing {rec.missing}, duplicates {rec.duplicates} ({doc['seconds']:.0f}s)",
                        err=True,
                    )
            assert rate is not None
            rates[corpus] = rate
        summary = summarise_compare(records)
        rows = [cell.row() for cell in summary]
        print_table(
            f"worker vs naive baseline, median (min-max) of {rounds} alternating rounds: burst = unpaced "
            f"{messages} messages; speed-up = median of the per-round ratios; paced = latency at a rate both carry; "
            "load = 1-minute load average after each burst; missing/dup/bad dlq per round",
            rows,
        )
        result = {
            "rounds": rounds,
            "messages": messages,
            "paced_seconds": paced_seconds,
            "paced_rate_per_s": rates,
            "order": "per corpus, rounds of baseline then worker (then worker-torch with --with-torch)",
            "cpus": os.cpu_count(),
            "rows": rows,
            "summary": [cell.as_dict() for cell in summary],
            "rounds_detail": detail,
        }
        prefix = self.out_dir / f"replay-compare-{self.stamp}"
        _write_json(prefix.with_suffix(".json"), result)
        _plot_compare(summary, prefix.with_suffix(".png"))
        return result

    def _compare_cell(
        self,
        corpus: str,
        repeat: float,
        label: str,
        kind: Literal["baseline", "worker"],
        env: dict[str, str],
        rnd: int,
        rounds: int,
        messages: int,
        paced_seconds: float,
        rate: float | None,
    ) -> tuple[CompareRound, dict[str, Any]]:
        """One target, one round: a fresh process, warmed up, an unpaced burst, then a paced run at ``rate``
        (None: half this burst's throughput). Returns the round's figures and its raw numbers."""
        t0 = time.monotonic()
        load_before = os.getloadavg()[0]
        info = {"corpus": corpus, "target": label, "round": rnd}
        with ExitStack() as stack:
            target = self.target(stack, kind, f"cmp-{corpus}-{label}-r{rnd}", env=env)
            burst = build_corpus(self.burst_texts, messages, repeat, 0.02, 1000, seed=11)
            b = replay_target(target, burst, None, progress=self.progress, run_info={**info, "phase": "burst"})
            load_burst = os.getloadavg()[0]
            if rate is None:
                rate = max(2.0, round(0.5 * (b.throughput_events_per_s or 1.0), 1))
            paced = build_corpus(self.paced_texts, max(50, int(rate * paced_seconds)), repeat, 0.02, 1000, seed=12)
            p = replay_target(target, paced, rate, progress=self.progress, run_info={**info, "phase": "paced"})
            load_paced = os.getloadavg()[0]
            if label == "worker" and corpus == "repeat50" and rnd == rounds - 1:
                self._keep(b, f"replay-worker-repeat50-burst-{self.stamp}")
                self._keep(p, f"replay-worker-repeat50-paced-{self.stamp}")
        rec = CompareRound(
            corpus,
            label,
            rnd,
            b.throughput_events_per_s,
            rate,
            p.latency_ms.get("p50", 0.0),
            p.latency_ms.get("p99", 0.0),
            load_burst,
            missing=b.missing + p.missing,
            duplicates=b.duplicate_events + p.duplicate_events,
            unexpected_dead_letters=b.unexpected_dead_letters + p.unexpected_dead_letters,
            cache_hit_rate=b.cache_hit_rate,
        )
        doc = {
            **asdict(rec),
            "load_1m_before": load_before,
            "load_1m_after_burst": load_burst,
            "load_1m_after_paced": load_paced,
            "seconds": round(time.monotonic() - t0, 1),
            "burst": b.summary(),
            "paced": p.summary(),
            "burst_dead_letters": b.dead_letters_by_reason,
            "burst_cache_levels": b.cache_levels,
            "paced_cache_levels": p.cache_levels,
            "model": b.run.get("model"),
        }
        return rec, doc

    def _keep(self, report: ReplayReport, name: str) -> None:
        report.event_samples = report.event_samples[:3000]  # keep the file reviewable
        write_report(report, self.out_dir / name)
        prof = profile_replay(report)
        write_profile(prof, self.out_dir / name.replace("replay-", "profile-", 1), title=f"Profile of {name}")
        click.echo(f"profile {name}: bottleneck {prof.bottleneck} - {prof.bottleneck_reason}", err=True)

    # -------------------------------------------------------------------------------------- sweep
    def sweep(self, saturation_messages: int, step_seconds: float) -> dict[str, Any]:
        with ExitStack() as stack:
            target = self.target(stack, "worker", "sweep", env=CACHE_OFF)
            result = sweep(
                target,
                self.all_texts,
                step_seconds=step_seconds,
                saturation_messages=saturation_messages,
                progress=self.progress,
            )
        result["cache"] = False
        print_table(
            f"latency vs load, caches off (saturation {result['saturation_events_per_s']:.0f} events/s)", result["rows"]
        )
        prefix = self.out_dir / f"replay-sweep-{self.stamp}"
        _write_json(prefix.with_suffix(".json"), result)
        plot_sweep(result["rows"], prefix.with_suffix(".png"))
        return result

    # ------------------------------------------------------------------------------------- stress
    def stress(self, messages: int, levels: Sequence[int] = (100, 1000, 10_000)) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        with ExitStack() as stack:
            target = self.target(stack, "worker", "stress")
            start_probe = target.probe() or {}
            for i, conversations in enumerate(levels):
                producers = min(conversations, 500)
                corpus = build_corpus(self.all_texts, messages, 0.5, 0.01, conversations, seed=30 + i)
                report = replay_target(
                    target,
                    corpus,
                    None,
                    progress=self.progress,
                    producers=producers,
                    linger_s=5.0,
                    run_info={"conversations": conversations},
                )
                rss = [s["rss_bytes"] for s in report.resource_samples if s.get("rss_bytes")]
                alive = target.exit_reason() is None
                rows.append(
                    {
                        "conversations": conversations,
                        "producers": producers,
                        "sent": report.sent,
                        "missing": report.missing,
                        "duplicates": report.duplicate_events,
                        "throughput_per_s": round(report.throughput_events_per_s, 1),
                        "p99_ms": round(report.latency_ms.get("p99", 0.0), 0),
                        "max_lag": report.max_lag,
                        "final_lag": report.final_lag,
                        "rss_mb_max": round(max(rss) / 2**20, 0) if rss else None,
                        "rss_mb_end": round(rss[-1] / 2**20, 0) if rss else None,
                        "worker_alive": alive,
                    }
                )
                runs.append(
                    {
                        "conversations": conversations,
                        "summary": report.summary(),
                        "lag_samples": report.lag_samples,
                        "resource_samples": report.resource_samples,
                    }
                )
                if not alive:
                    break
        print_table(f"stress: {messages} messages per level, unpaced", rows)
        result = {
            "rows": rows,
            "runs": runs,
            "rss_mb_after_warmup": (start_probe.get("rss_bytes") or 0) / 2**20,
            "rss_source": "metrics endpoint" if start_probe.get("from_endpoint") else "psutil on the pid",
        }
        prefix = self.out_dir / f"replay-stress-{self.stamp}"
        _write_json(prefix.with_suffix(".json"), result)
        _plot_stress(runs, prefix.with_suffix(".png"))
        return result

    # ----------------------------------------------------------------------------------- overhead
    def overhead(self, seconds: float, worker_messages: int) -> dict[str, Any]:
        result: dict[str, Any] = {"in_process": _sampler_overhead_in_process(self.settings, seconds)}
        direct = result["in_process"]["direct"]
        click.echo(
            f"one sampler reading costs {direct['per_sample_cpu_us']} us of CPU: "
            f"{direct['cpu_share_at_1s']:.4%} of a core at 1 s, {direct['cpu_share_at_50ms']:.3%} at 50 ms",
            err=True,
        )
        print_table("sampler on/off in an inference loop (batches/s, interleaved rounds)", result["in_process"]["rows"])
        # the worker with its sampler at 1 s against effectively off (1 h), alternated, same corpus each time
        rows: list[dict[str, Any]] = []
        plan = [("sampler 1 s", "1"), ("sampler off (1 h)", "3600")] * 2
        result["worker"] = rows
        for label, interval in plan:
            with ExitStack() as stack:
                env = {"EMOTION_STREAM_METRICS__PROFILE_SAMPLE_INTERVAL_S": interval}
                target = self.target(stack, "worker", f"ovh-{interval}", env=env)
                if interval == "1" and not (target.probe() or {}).get("from_endpoint"):
                    result["worker"] = "not measured: the worker publishes no emotion_process_rss_bytes (no sampler)"
                    click.echo(result["worker"], err=True)
                    break
                corpus = build_corpus(self.burst_texts, 2 * worker_messages, 0.0, 0.0, 500, seed=40)
                r = replay_target(target, corpus, None, progress=self.progress)
            rows.append({"what": label, "throughput_per_s": round(r.throughput_events_per_s, 1)})
        if rows and result["worker"] is rows:
            print_table("worker throughput (unpaced burst), sampler on vs off", rows)
        _write_json(self.out_dir / f"replay-overhead-{self.stamp}.json", result)
        return result


def _sampler_overhead_in_process(settings: Settings, seconds: float) -> dict[str, Any]:
    """The sampler's cost, two ways: the CPU time of one reading (exact, noise-free), and inference batches
    per second with the sampler off / at 1 s / at 50 ms, interleaved over several short rounds (an A/B on a
    shared machine, so its spread is reported too)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stream_app.inference.tokenize import TextEncoder
    from stream_app.inference.torch_engine import TorchEngine
    from stream_app.metrics import Metrics
    from stream_app.sampler import ResourceSampler
    from stream_app.service import resolve_model_path

    probe = ResourceSampler(Metrics(), 1.0)
    n_calls = 2000
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(n_calls):
        probe.sample_once()
    per_sample_cpu_us = (time.thread_time() - cpu0) / n_calls * 1e6
    per_sample_wall_us = (time.perf_counter() - wall0) / n_calls * 1e6
    probe.stop()

    path = resolve_model_path(settings)
    engine = TorchEngine(path, num_threads=0)
    encoder = TextEncoder.from_pretrained(path, max_length=settings.model.max_length_tokens)
    texts = load_texts("dev", settings.data.goemotions_dir)[:32]
    batch = encoder(texts)
    engine.predict(batch)

    def run(interval: float | None, span: float) -> float:
        sampler = ResourceSampler(Metrics(), interval).start() if interval else None
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < span:
            engine.predict(batch)
            n += 1
        rate = n / (time.perf_counter() - t0)
        if sampler is not None:
            sampler.stop()
        return rate

    settings_ab: list[tuple[str, float | None]] = [("off", None), ("1 s", 1.0), ("50 ms", 0.05)]
    rounds = 6
    results: dict[str, list[float]] = {k: [] for k, _ in settings_ab}
    for r in range(rounds):  # rotate the order so drift of the shared machine hits every setting alike
        for label, interval in settings_ab[r % 3 :] + settings_ab[: r % 3]:
            results[label].append(run(interval, seconds / rounds * 2))
    off = float(np.mean(results["off"]))
    rows = [
        {
            "what": f"sampler {label}",
            "batches_per_s": round(float(np.mean(v)), 2),
            "min": round(min(v), 2),
            "max": round(max(v), 2),
            "vs_off": f"{(float(np.mean(v)) - off) / off:+.1%}",
        }
        for label, v in results.items()
    ]
    engine.close()
    direct = {
        "per_sample_cpu_us": round(per_sample_cpu_us, 1),
        "per_sample_wall_us": round(per_sample_wall_us, 1),
        "cpu_share_at_1s": per_sample_cpu_us / 1e6,
        "cpu_share_at_50ms": per_sample_cpu_us / 5e4,
        "gpu_note": probe.gpu_note,
    }
    return {"direct": direct, "rows": rows, "raw": results, "batch_size": len(texts), "rounds": rounds}


def _plot_compare(cells: Sequence[CellSummary], path: Path) -> None:
    """Medians as bars, min-max over the rounds as error bars; the speed-up over each worker bar."""
    from matplotlib.figure import Figure

    def bars(ax: Any, spreads: Sequence[Spread], **kw: Any) -> Any:
        med = [s.median for s in spreads]
        err = [[s.median - s.min for s in spreads], [s.max - s.median for s in spreads]]
        return ax.bar(labels, med, yerr=err, capsize=3, **kw)

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_tp, ax_lat = fig.subplots(1, 2)
    labels = [f"{c.corpus}\n{c.target}" for c in cells]
    colors = ["tab:gray" if c.target == "baseline" else "tab:blue" for c in cells]
    bars(ax_tp, [c.burst_events_per_s for c in cells], color=colors)
    for x, c in enumerate(cells):
        if c.speed_up is not None:
            ax_tp.annotate(f"{c.speed_up.format(1, 'x')}", (x, c.burst_events_per_s.max), xytext=(0, 4),
                           textcoords="offset points", ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax_tp.margins(y=0.12)
    ax_tp.set_ylabel("events/s, unpaced burst")
    ax_tp.set_title(f"median, min-max of {cells[0].rounds} rounds; speed-up per round", fontsize=9)
    bars(ax_lat, [c.p99_ms for c in cells], color=colors, label="p99")
    bars(ax_lat, [c.p50_ms for c in cells], color="black", alpha=0.35, label="p50")
    rates = " / ".join(f"{c.paced_rate_per_s:g}" for c in cells if c.target == "baseline")
    ax_lat.set_ylabel(f"end-to-end ms at {rates} msg/s")
    ax_lat.set_yscale("log")
    ax_lat.legend()
    fig.savefig(path, dpi=100)


def _plot_stress(runs: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), layout="constrained")
    ax_lag, ax_rss = fig.subplots(2, 1)
    for run in runs:
        lag = run["lag_samples"]
        ax_lag.plot([s[0] for s in lag], [s[1] for s in lag], label=f"{run['conversations']} conversations")
        res = run["resource_samples"]
        ax_rss.plot([s["t"] for s in res], [s["rss_bytes"] / 2**20 for s in res], label=f"{run['conversations']}")
    ax_lag.set_ylabel("consumer lag")
    ax_lag.legend()
    ax_rss.set_ylabel("worker RSS (MiB)")
    ax_rss.set_xlabel("seconds since the first send")
    fig.savefig(path, dpi=100)


@click.command()
@click.option("--modes", default="compare,sweep,stress,overhead", show_default=True)
@click.option("--messages", type=int, default=1000, show_default=True, help="Burst size (compare, sweep).")
@click.option("--paced-seconds", type=float, default=15.0, show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="compare: alternating rounds per corpus (baseline, worker, baseline, worker...), each a fresh process.",
)
@click.option(
    "--paced-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="compare: the paced run's rate in msg/s (default: half the first baseline burst of each corpus).",
)
@click.option(
    "--with-torch",
    is_flag=True,
    help="compare: also the worker on the baseline's engine (PyTorch fp32), unique texts (+25 % time).",
)
@click.option("--step-seconds", type=float, default=15.0, show_default=True, help="Per sweep step.")
@click.option("--saturation-messages", type=int, default=3000, show_default=True, help="Sweep's unpaced burst.")
@click.option("--stress-messages", type=int, default=3000, show_default=True)
@click.option("--overhead-seconds", type=float, default=8.0, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@click.option("--no-progress", is_flag=True)
def main(
    modes: str,
    messages: int,
    paced_seconds: float,
    rounds: int,
    paced_rate: float | None,
    with_torch: bool,
    step_seconds: float,
    saturation_messages: int,
    stress_messages: int,
    overhead_seconds: float,
    out_dir: Path,
    no_progress: bool,
) -> None:
    """Run the replay benchmark on a local Kafka (see the module docstring)."""
    import logging

    exit_on_sigterm()  # a kill stops the local Kafka and the workers as Ctrl-C does

    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    stamp = _stamp()
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    host: dict[str, Any] = {"cpus": os.cpu_count()}
    with local_kafka(settings.data.cache_dir) as kafka:
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": kafka.bootstrap_servers})}
        )
        bench = Bench(settings, out_dir, stamp, progress=not no_progress)
        for mode in wanted:
            t0 = time.monotonic()
            load0 = os.getloadavg()
            if mode == "compare":
                bench.compare(messages, paced_seconds, rounds, paced_rate, with_torch)
            elif mode == "sweep":
                bench.sweep(saturation_messages, step_seconds)
            elif mode == "stress":
                bench.stress(stress_messages)
            elif mode == "overhead":
                bench.overhead(overhead_seconds, messages)
            else:
                raise click.BadParameter(f"unknown mode {mode!r}")
            timings[mode] = round(time.monotonic() - t0, 1)
            host[mode] = {"seconds": timings[mode], "loadavg_start": load0, "loadavg_end": os.getloadavg()}
        # worker logs stay in bench.tmp when a mode fails (the error names them); removed after a clean run
        shutil.rmtree(bench.tmp, ignore_errors=True)
    # the machine is shared: the load average next to every figure says how quiet it was
    _write_json(out_dir / f"replay-host-{stamp}.json", host)
    click.echo(f"done in {time.monotonic() - t_start:.0f}s: {timings}; results in {out_dir}", err=True)


if __name__ == "__main__":
    main()
