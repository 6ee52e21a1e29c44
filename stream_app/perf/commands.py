"""``emotion-stream replay | baseline | profile | sweep``: measure the worker, and what it is measured against.

The project CLI attaches these with ``main.add_command(...)``; ``python -m stream_app.perf.commands
<verb>`` runs them alone (the replay benchmark starts the baseline that way). The helpers here
(:func:`running_target`, :func:`warm_up`, :func:`replay_target`, :func:`sweep`) start a worker or the
baseline against a cluster (a local Apache Kafka when none is given, via ``local_stack``) and are
shared with ``benchmarks/replay.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import click

from stream_app.errors import EmotionStreamError, ModelError
from stream_app.settings import KafkaSettings, Settings, TopicSettings, load_settings

__all__ = [
    "RunningTarget",
    "baseline",
    "fresh_topics",
    "perf",
    "profile",
    "replay",
    "replay_target",
    "running_target",
    "sweep",
    "sweep_command",
    "warm_up",
]

TargetKind = Literal["worker", "baseline"]
DEFAULT_RESULTS = Path("benchmarks/results")


# ------------------------------------------------------------------------------------------- helpers
def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def fresh_topics(settings: Settings, tag: str) -> TopicSettings:
    """The settings' topics with ``.<tag>`` appended to every name (a clean slate per run)."""
    t = settings.topics
    return t.model_copy(
        update={
            "input": f"{t.input}.{tag}",
            "events": f"{t.events}.{tag}",
            "metrics": f"{t.metrics}.{tag}",
            "dead_letters": f"{t.dead_letters}.{tag}",
            "conversations": f"{t.conversations}.{tag}",
            "alerts": f"{t.alerts}.{tag}",
        }
    )


def _topic_env(topics: TopicSettings) -> dict[str, str]:
    return {
        "EMOTION_STREAM_TOPICS__INPUT": topics.input,
        "EMOTION_STREAM_TOPICS__EVENTS": topics.events,
        "EMOTION_STREAM_TOPICS__METRICS": topics.metrics,
        "EMOTION_STREAM_TOPICS__DEAD_LETTERS": topics.dead_letters,
        "EMOTION_STREAM_TOPICS__CONVERSATIONS": topics.conversations,
        "EMOTION_STREAM_TOPICS__ALERTS": topics.alerts,
        "EMOTION_STREAM_TOPICS__PARTITIONS": str(topics.partitions),
    }


@dataclass
class RunningTarget:
    """A worker or baseline child process serving ``/metrics``, and where it reads and writes."""

    kind: TargetKind
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    group_id: str
    kafka: KafkaSettings
    topics: TopicSettings
    settings: Settings
    started_mono: float = 0.0  # when the process was launched (local_stack may already wait for it)
    _ps: Any = None

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: bytes = resp.read()
        return body.decode()

    def exit_reason(self) -> str | None:
        """None while the process runs; otherwise why the run must stop."""
        code = self.process.poll()
        return None if code is None else f"{self.kind} exited with {code}; see {self.log_path}"

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Wait until ``/metrics`` answers (the model is loaded); returns the seconds since the launch."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            reason = self.exit_reason()
            if reason is not None:
                raise click.ClickException(f"{reason}\n{self.log_tail()}")
            try:
                self.scrape()
                return time.monotonic() - (self.started_mono or t0)
            except OSError:
                time.sleep(0.5)
        raise click.ClickException(f"{self.kind} not ready in {timeout_s:.0f}s\n{self.log_tail()}")

    def probe(self) -> dict[str, float] | None:
        """RSS and CPU of the child: from its metrics endpoint (profiler gauges), else from psutil."""
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError):
            for family in text_string_to_metric_families(self.scrape()):
                for sample in family.samples:
                    if sample.name in ("emotion_process_rss_bytes", "emotion_process_cpu_percent"):
                        values[sample.name] = float(sample.value)
        if values.get("emotion_process_rss_bytes", 0.0) > 0:
            return {
                "rss_bytes": values["emotion_process_rss_bytes"],
                "cpu_percent": values.get("emotion_process_cpu_percent", 0.0),
                "from_endpoint": 1.0,
            }
        import psutil

        try:
            if self._ps is None or self._ps.pid != self.process.pid:
                # keep one handle: cpu_percent measures since the previous call on the same object
                self._ps = psutil.Process(self.process.pid)
                self._ps.cpu_percent(None)
            proc = self._ps
            return {
                "rss_bytes": float(proc.memory_info().rss),
                "cpu_percent": float(proc.cpu_percent(None)),
                "from_endpoint": 0.0,
            }
        except psutil.Error:
            return None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_target(
    kind: TargetKind,
    settings: Settings,
    run_dir: Path,
    *,
    tag: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[RunningTarget]:
    """A Kafka (local unless ``settings.kafka.bootstrap_servers``), topics and a worker or the baseline.

    With ``tag`` the topics get fresh names (``<topic>.<tag>``) and the group a fresh id, so the run
    starts from nothing; ``env`` adds ``EMOTION_STREAM_*`` overrides for the child.
    """
    from stream_app.devtools.kafka_local import free_port
    from stream_app.devtools.stack import local_stack, worker_process

    run_dir.mkdir(parents=True, exist_ok=True)
    topics = fresh_topics(settings, tag) if tag else settings.topics
    app_id = f"{settings.worker.app_id}-{tag}" if tag else settings.worker.app_id
    cell = settings.model_copy(update={"topics": topics})
    port = free_port()
    child_env = {
        **_topic_env(topics),
        "EMOTION_STREAM_WORKER__APP_ID": app_id,
        "EMOTION_STREAM_WORKER__WORKER_ID": f"{kind}-{tag or 'main'}",
        "EMOTION_STREAM_METRICS__PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    group = app_id if kind == "worker" else f"{app_id}-baseline"
    launched = time.monotonic()
    with local_stack(cell, run_dir, start_worker=kind == "worker", env=child_env) as stack:
        if kind == "worker":
            assert stack.worker is not None
            yield RunningTarget(kind, stack.worker, port, stack.worker_log, group, stack.kafka, topics, cell, launched)
            return
        log = run_dir / "baseline.log"
        launched = time.monotonic()
        with worker_process(stack.env, log, command=("baseline",)) as proc:
            yield RunningTarget(kind, proc, port, log, group, stack.kafka, topics, cell, launched)


def warm_up(target: RunningTarget, n: int = 40, timeout_s: float = 300.0) -> Any:
    """Send ``n`` throw-away messages and wait for them, so start-up (group join, first batches) is not
    measured. Their texts are synthetic, so they do not pre-fill the cache for the corpus."""
    from stream_app.perf.replay import build_corpus, run_replay

    texts = [f"warm-up message {i}: the worker is starting, nothing to feel about it" for i in range(n)]
    corpus = build_corpus(texts, n, conversations=max(1, n // 2), seed=0, id_prefix=f"warm{uuid.uuid4().hex[:6]}")
    report = asyncio.run(
        run_replay(target.kafka, target.topics, corpus, None, None, timeout_s, progress=False, linger_s=0.5,
                   should_abort=target.exit_reason)
    )  # fmt: skip
    if not report.completed:
        raise click.ClickException(
            f"warm-up incomplete ({report.missing} of {n} missing; {report.aborted or 'timeout'})\n{target.log_tail()}"
        )
    return report


def replay_target(
    target: RunningTarget,
    corpus: Any,
    rate_per_s: float | None,
    *,
    timeout_s: float = 600.0,
    progress: bool = True,
    producers: int = 1,
    linger_s: float = 2.0,
    run_info: Mapping[str, Any] | None = None,
) -> Any:
    """:func:`~stream_app.perf.replay.run_replay` against a running target, watching its group, its resources
    and its process (a dead child ends the run early)."""
    from stream_app.perf.replay import run_replay

    info = {
        "target": target.kind,
        "max_batch_size": target.settings.batching.max_batch_size,
        "log": str(target.log_path),
        **(run_info or {}),
    }
    return asyncio.run(
        run_replay(
            target.kafka,
            target.topics,
            corpus,
            rate_per_s or None,
            target.group_id,
            timeout_s,
            progress,
            producers=producers,
            linger_s=linger_s,
            resource_probe=target.probe,
            should_abort=target.exit_reason,
            run_info=info,
        )
    )


def sweep(
    target: RunningTarget,
    texts: Sequence[str],
    *,
    fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25),
    step_seconds: float = 20.0,
    saturation_messages: int = 3000,
    seed: int = 0,
    progress: bool = True,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Latency versus offered load: an unpaced burst finds the saturation throughput, then each fraction of
    it is offered for ``step_seconds``. Returns ``{"saturation": .., "rows": [...], "reports": [...]}``."""
    from stream_app.perf.replay import build_corpus

    rng_seed = seed
    burst = build_corpus(texts, saturation_messages, conversations=200, seed=rng_seed)
    first = replay_target(target, burst, None, timeout_s=timeout_s, progress=progress, run_info={"step": "saturation"})
    # the whole burst, not its steady middle: the adaptive token budget settles during the first batches,
    # and a short burst's middle overstates what the worker sustains
    saturation = first.throughput_events_per_s
    rows = [_sweep_row("saturation (unpaced)", None, first)]
    reports = [first.summary()]
    for fraction in fractions:
        rate = max(1.0, saturation * fraction)
        n = max(20, int(rate * step_seconds))
        rng_seed += 1
        corpus = build_corpus(texts, n, conversations=200, seed=rng_seed)
        report = replay_target(target, corpus, rate, timeout_s=timeout_s, progress=progress,
                               run_info={"step": f"{fraction:.0%}"})  # fmt: skip
        rows.append(_sweep_row(f"{fraction:.0%}", rate, report))
        reports.append(report.summary())
        if report.aborted:
            break
    return {"saturation_events_per_s": saturation, "rows": rows, "reports": reports}


def _sweep_row(step: str, rate: float | None, report: Any) -> dict[str, Any]:
    return {
        "step": step,
        "offered_per_s": round(rate, 1) if rate else None,
        "throughput_per_s": round(report.throughput_events_per_s, 1),
        "p50_ms": round(report.latency_ms.get("p50", 0.0), 1),
        "p95_ms": round(report.latency_ms.get("p95", 0.0), 1),
        "p99_ms": round(report.latency_ms.get("p99", 0.0), 1),
        "max_lag": report.max_lag,
        "final_lag": report.final_lag,
        "missing": report.missing,
    }


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A rich table of ``rows`` (the keys of the first row are the columns)."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), justify="left" if col in ("step", "target", "mode", "corpus", "what") else "right")
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    # piped to a file or a log: wide enough that no column is cut to an ellipsis
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _settings_with_bootstrap(bootstrap: str | None) -> Settings:
    settings = load_settings()
    if bootstrap:
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})}
        )
    return settings


def _ensure_model(settings: Settings) -> str:
    from stream_app.service import resolve_model_path

    try:
        return resolve_model_path(settings)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc


# ------------------------------------------------------------------------------------------ commands
@click.command()
@click.option("--input", "source", default="dev", show_default=True, help="dev, train, or a TSV/JSONL path.")
@click.option("--messages", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Messages/s; 0 = unpaced.")
@click.option("--repeat", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Share of repeated texts.")
@click.option("--malformed", type=click.FloatRange(0, 1), default=0.02, show_default=True)
@click.option("--conversations", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--producers", type=click.IntRange(min=1), default=1, show_default=True, help="Concurrent producers.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--bootstrap", default=None, help="Cluster to use (default: settings, else a local Kafka).")
@click.option(
    "--start-worker/--no-start-worker",
    default=None,
    help="Start a worker (default: yes when no cluster is configured, else use the running workers).",
)
@click.option("--group", default=None, help="Consumer group whose lag to watch (default: the worker's app id).")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=40, show_default=True, help="Warm-up messages.")
@click.option("--out", default=None, help="Output prefix (default benchmarks/results/replay-<time>).")
@click.option("--no-progress", is_flag=True)
def replay(
    source: str,
    messages: int,
    rate: float,
    repeat: float,
    malformed: float,
    conversations: int,
    producers: int,
    seed: int,
    bootstrap: str | None,
    start_worker: bool | None,
    group: str | None,
    timeout_s: float,
    warmup: int,
    out: str | None,
    no_progress: bool,
) -> None:
    """Replay a chat corpus through the worker and account for every message (JSON + PNG report)."""
    from stream_app.perf.replay import build_corpus, load_texts, run_replay, write_report

    settings = _settings_with_bootstrap(bootstrap)
    if repeat + malformed > 1:
        raise click.BadParameter("--repeat plus --malformed must be at most 1")
    try:
        texts = load_texts(source, settings.data.goemotions_dir)
        corpus = build_corpus(texts, messages, repeat, malformed, conversations, seed)
    except (EmotionStreamError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    prefix = Path(out) if out else DEFAULT_RESULTS / f"replay-{_stamp()}"
    start = start_worker if start_worker is not None else not settings.kafka.bootstrap_servers
    run_info = {"input": source, "repeat_share": repeat, "malformed_share": malformed, "command": "replay"}
    if start:
        _ensure_model(settings)
        with (
            tempfile.TemporaryDirectory(prefix="emotion-replay-") as tmp,
            running_target("worker", settings, Path(tmp)) as target,
        ):
            click.echo(f"worker ready in {target.wait_ready():.0f}s (log {target.log_path})", err=True)
            if warmup:
                warm_up(target, warmup)
            report = replay_target(target, corpus, rate, timeout_s=timeout_s, progress=not no_progress,
                                   producers=producers, run_info=run_info)  # fmt: skip
    else:
        if not settings.kafka.bootstrap_servers:
            raise click.UsageError(
                "--no-start-worker needs a cluster: --bootstrap or EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS"
            )
        report = asyncio.run(
            run_replay(settings.kafka, settings.topics, corpus, rate or None,
                       group or settings.worker.app_id, timeout_s, not no_progress, producers=producers,
                       run_info={**run_info, "max_batch_size": settings.batching.max_batch_size})
        )  # fmt: skip
    json_path, png_path = write_report(report, prefix)
    print_table("replay", [{"what": k, "value": v} for k, v in report.summary().items()])
    if report.dead_letters_by_reason:
        click.echo(f"dead letters by reason: {report.dead_letters_by_reason} (planted {report.expected_dead_letters})")
    click.echo(f"wrote {json_path} and {png_path}")
    if not report.completed:
        raise click.ClickException(f"{report.missing} messages have no event and no dead letter")


@click.command()
@click.option("--max-messages", type=click.IntRange(min=1), default=None, help="Stop after this many messages.")
def baseline(max_messages: int | None) -> None:
    """Run the naive baseline (one pipeline() call per message) against the configured cluster."""
    import logging

    from stream_app.metrics import Metrics, serve_metrics
    from stream_app.perf.baseline import BaselineConfig, NaiveClassifier, run_baseline
    from stream_app.sampler import ResourceSampler

    settings = load_settings()
    logging.basicConfig(
        level=settings.worker.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.kafka.bootstrap_servers:
        raise click.UsageError("set EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS")
    model_path = _ensure_model(settings)
    try:
        classifier = NaiveClassifier(
            model_path,
            device=settings.model.device,
            num_threads=settings.model.num_threads,
            max_length=settings.model.max_length_tokens,
        )
    except EmotionStreamError as exc:
        raise click.ClickException(str(exc)) from exc
    metrics = Metrics()
    sampler = ResourceSampler(metrics, settings.metrics.profile_sample_interval_s).start()
    logging.getLogger(__name__).info(sampler.gpu_note)
    if settings.metrics.port:
        serve_metrics(metrics, settings.metrics.host, settings.metrics.port)
    cfg = BaselineConfig.from_settings(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stats = await run_baseline(cfg, classifier, metrics=metrics, stop=stop, max_messages=max_messages)
        click.echo(f"baseline stopped: {stats}", err=True)

    try:
        asyncio.run(main())
    finally:
        sampler.stop()


def _profile_prefix(source: Path) -> Path:
    name = source.name.removesuffix(".json")
    new = name.replace("replay-", "profile-", 1) if name.startswith("replay-") else f"{name}-profile"
    return source.with_name(new)


@click.command()
@click.option("--from", "source", required=True, help="Prefix (or .json) of a recorded replay report.")
@click.option("--out", default=None, help="Output prefix (default: replay-X -> profile-X beside it).")
def profile(source: str, out: str | None) -> None:
    """Turn a recorded replay into a bottleneck report (Markdown + JSON + PNG) and print the bottleneck."""
    from stream_app.perf.profile import profile_replay, write_profile
    from stream_app.perf.replay import read_report

    try:
        report = read_report(source)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the replay report {source}: {exc}") from exc
    prof = profile_replay(report)
    prefix = Path(out) if out else _profile_prefix(Path(source))
    paths = write_profile(prof, prefix, title=f"Profile of {Path(source).name}")
    click.echo(f"bottleneck: {prof.bottleneck} - {prof.bottleneck_reason}")
    for rec in prof.recommendations:
        click.echo(f"  - {rec}")
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@click.command("sweep")
@click.option("--input", "source", default="dev", show_default=True, help="dev, train, or a TSV/JSONL path.")
@click.option("--fractions", default="0.25,0.5,0.75,1.0,1.25", show_default=True, help="Of the saturation rate.")
@click.option("--step-seconds", type=float, default=20.0, show_default=True)
@click.option("--saturation-messages", type=click.IntRange(min=50), default=3000, show_default=True)
@click.option("--bootstrap", default=None, help="Cluster to use (default: settings, else a local Kafka).")
@click.option("--cache/--no-cache", default=False, show_default=True, help="Keep the worker's caches on.")
@click.option("--out", default=None, help="Output prefix (default benchmarks/results/replay-sweep-<time>).")
@click.option("--no-progress", is_flag=True)
def sweep_command(
    source: str,
    fractions: str,
    step_seconds: float,
    saturation_messages: int,
    bootstrap: str | None,
    cache: bool,
    out: str | None,
    no_progress: bool,
) -> None:
    """Latency versus offered load on a fresh worker (caches off by default: the inference path)."""
    import json

    from stream_app.perf.replay import load_texts

    settings = _settings_with_bootstrap(bootstrap)
    _ensure_model(settings)
    try:
        steps = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"--fractions: {exc}") from exc
    texts = load_texts(source, settings.data.goemotions_dir)
    env = {} if cache else {"EMOTION_STREAM_CACHE__L1_ENABLED": "false", "EMOTION_STREAM_CACHE__L2_ENABLED": "false"}
    with (
        tempfile.TemporaryDirectory(prefix="emotion-sweep-") as tmp,
        running_target("worker", settings, Path(tmp), tag=uuid.uuid4().hex[:8], env=env) as target,
    ):
        target.wait_ready()
        warm_up(target)
        result = sweep(target, texts, fractions=steps, step_seconds=step_seconds,
                       saturation_messages=saturation_messages, progress=not no_progress)  # fmt: skip
    prefix = Path(out) if out else DEFAULT_RESULTS / f"replay-sweep-{_stamp()}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    result["cache"] = cache
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(result, indent=2))
    plot_sweep(result["rows"], prefix.with_name(prefix.name + ".png"))
    print_table(f"latency vs load (saturation {result['saturation_events_per_s']:.0f} events/s)", result["rows"])


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """p50/p95/p99 against offered rate (the paced steps of a sweep)."""
    from matplotlib.figure import Figure

    paced = [r for r in rows if r["offered_per_s"]]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    x = [r["offered_per_s"] for r in paced]
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        ax.plot(x, [r[key] for r in paced], style, label=key.replace("_ms", ""))
    ax.set_yscale("log")
    ax.set_xlabel("offered messages/s")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=100)


@click.group()
def perf() -> None:
    """Performance tools: replay, baseline, profile, sweep."""


for _cmd in (replay, baseline, profile, sweep_command):
    perf.add_command(_cmd)


if __name__ == "__main__":
    perf()
