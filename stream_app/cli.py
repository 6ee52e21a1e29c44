"""The ``emotion-stream`` command: worker, demo, topics, model (build/evaluate/export)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import NoReturn

import click
import numpy as np
from pydantic import ValidationError

from stream_app.devtools.processes import exit_on_sigterm
from stream_app.errors import EmotionStreamError, InfrastructureError, ModelError
from stream_app.settings import KafkaSettings, Settings, load_settings

__all__ = ["main"]

_log = logging.getLogger("stream_app")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_settings() -> Settings:
    """The settings, or a one-line error naming each invalid variable (instead of pydantic's report)."""
    try:
        return load_settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = "__".join(str(part) for part in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"EMOTION_STREAM_{where}: {message}" if where else message)
        raise click.ClickException(f"invalid settings: {'; '.join(problems)}") from None


@click.group()
def main() -> None:
    """emotion-stream: classify the emotion of chat messages flowing through Kafka."""
    # demo, replay, sweep and baseline start a local Kafka and workers: SIGTERM must stop them too
    exit_on_sigterm()


@main.command()
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this host, each a group member with its own HTTP port (metrics port + i) and "
    "state folder; for a many-core GPU host (see the README's Performance section).",
)
def worker(processes: int) -> None:
    """Run a worker against the cluster in EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS."""
    settings = _load_settings()
    from stream_app.worker.logs import setup_logging

    setup_logging(settings.worker.log_level)
    if not settings.kafka.bootstrap_servers:
        raise click.UsageError("set EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS (or use `emotion-stream demo`)")
    if processes > 1:
        from stream_app.worker.processes import supervise

        sys.exit(supervise(settings, processes))
    # The tokenizer and the engine run in threads that need the GIL back the moment their C++ work ends;
    # the default 5 ms switch interval let the event loop hold it that long after every batch.
    sys.setswitchinterval(settings.worker.gil_switch_interval_ms / 1000.0)
    # The tokenizer's Rayon pool is sized when it first runs: before any model or tokenizer loads.
    os.environ.setdefault("RAYON_NUM_THREADS", str(settings.worker.resolved_tokenizer_threads()))
    if not settings.model.cpu_spin_wait:
        # OpenMP threads (PyTorch) sleep when idle instead of spinning; must be set before torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from stream_app.worker.run import run_worker

    sys.exit(run_worker(settings))


@main.command()
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partitions of the topics to create (default: EMOTION_STREAM_TOPICS__PARTITIONS). An existing topic "
    "with another count is left unchanged and reported; when --partitions was given, the command then fails.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for the cluster before giving up (default: EMOTION_STREAM_KAFKA__ADMIN_TIMEOUT_S).",
)
def topics(partitions: int | None, timeout_s: float | None) -> None:
    """Create the input, events, metrics and dead-letter topics (existing ones are kept and reported)."""
    settings = _load_settings()
    if not settings.kafka.bootstrap_servers:
        raise click.ClickException("no cluster given: set EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS (host:port,...)")
    # aiokafka logs every failed connection attempt; the one error below says why, once
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    from stream_app.topics import ensure_app_topics

    try:
        report = ensure_app_topics(settings, partitions=partitions, timeout_s=timeout_s)
    except EmotionStreamError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report.lines():
        click.echo(line)
    if partitions is not None and report.mismatched:
        names = ", ".join(f"{name} ({n})" for name, n in report.mismatched.items())
        raise click.ClickException(
            f"{names} already exist with another partition count than --partitions {partitions}; Kafka can add "
            "partitions to a topic (kafka-topics.sh --alter --partitions N) but never remove them"
        )
    click.echo("topics ready")


def _demo_texts(settings: Settings, n: int, seed: int) -> list[str]:
    dev = settings.data.goemotions_dir / "dev.tsv"
    if dev.exists():
        texts = [line.split("\t", 1)[0] for line in dev.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from stream_app.service import parity_texts

        texts = parity_texts()
    rng = random.Random(seed)
    return [rng.choice(texts) for _ in range(n)]


def _ensure_model(settings: Settings) -> None:
    from stream_app.service import resolve_model_path

    try:
        resolve_model_path(settings)
    except ModelError:
        click.echo("No model built yet: building it now (about 11 minutes on 2 cores, once).")
        from stream_app.model.train import build_model

        build_model(settings.data.goemotions_dir, settings.data.cache_dir)


def _log_tail(log: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of ``log`` ("" when it does not exist)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _keep_log(settings: Settings, log: Path) -> Path | None:
    """Copy a failed worker's log out of the demo's temporary folder (which is deleted); its new path."""
    if not log.exists():
        return None
    folder = settings.data.cache_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"demo-worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    shutil.copyfile(log, kept)
    return kept


def _worker_failed(console: object, settings: Settings, log: Path, what: str) -> NoReturn:
    """Say that the demo's worker failed, with its log's tail, keep the log, and end the command (exit 1)."""
    from rich.console import Console
    from rich.markup import escape

    assert isinstance(console, Console)
    tail = _log_tail(log)
    kept = _keep_log(settings, log)
    console.print(f"[red]{escape(what)}[/]")
    if tail:
        console.print(f"[dim]--- last lines of the worker's log ---[/]\n{escape(tail)}\n[dim]---[/]")
    raise click.ClickException(f"{what}; its full log is kept at {kept}" if kept else what)


@main.command()
@click.option("--messages", type=int, default=600, show_default=True, help="Chat messages to replay.")
@click.option("--rate", type=float, default=150.0, show_default=True, help="Messages per second (0: unpaced).")
@click.option("--malformed", type=float, default=0.02, show_default=True, help="Share of malformed messages.")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(messages: int, rate: float, malformed: float, seed: int) -> None:
    """Start a local Kafka (unless bootstrap servers are set), a worker, and replay chat messages."""
    settings = _load_settings()
    _setup_logging("warning")
    from rich.console import Console

    from stream_app.devtools.stack import local_stack

    console = Console()
    _ensure_model(settings)
    with tempfile.TemporaryDirectory(prefix="emotion-demo-") as tmp, contextlib.ExitStack() as stack:
        run_dir = Path(tmp)
        try:
            with console.status("starting Apache Kafka and the worker..."):
                env = {"EMOTION_STREAM_WORKER__WORKER_ID": "demo-worker"}
                running = stack.enter_context(local_stack(settings, run_dir, env=env))
        except InfrastructureError as exc:  # the worker (or Kafka) did not start: say why, keep the log
            _worker_failed(console, settings, run_dir / "worker.log", f"the demo could not start: {exc}")
        assert running.worker is not None
        if running.port_taken is not None:
            console.print(
                f"[yellow]port {running.port_taken} is taken (another worker?): the demo's worker serves its "
                f"metrics on :{running.metrics_port} instead[/]"
            )
        console.print(
            f"[green]Kafka[/] {running.bootstrap_servers}  [green]worker[/] pid {running.worker.pid}"
            f"  metrics :{running.metrics_port}/metrics  log {running.worker_log}"
        )
        texts = _demo_texts(settings, messages, seed)
        try:
            died = asyncio.run(
                _demo_loop(console, settings, running.kafka, texts, rate, malformed, seed, running.worker)
            )
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the worker and Kafka (Ctrl-C again: kill them now)[/]")
            return
        if died is not None:
            _worker_failed(console, settings, running.worker_log, f"the demo's worker exited with {died}")


async def _demo_loop(
    console: object,
    settings: Settings,
    kafka: KafkaSettings,
    texts: list[str],
    rate: float,
    malformed: float,
    seed: int,
    proc: subprocess.Popen[bytes],
) -> int | None:
    """Replay ``texts`` and show events as they come; returns the worker's exit code if it died first
    (noticed within a fifth of a second, not when the next event fails to come), else None."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from stream_app.devtools.clients import chat_message, consume, produce_all

    assert isinstance(console, Console)
    rng = random.Random(seed)
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, text in enumerate(texts):
        if rng.random() < malformed:
            records.append((f"c-{i % 40}".encode(), rng.choice([b"{not json", b"\xff\xfe", b'{"text": 3}'])))
        else:
            records.append(chat_message(f"m-{i}", f"c-{i % 40}", text, user_id=f"u-{i % 17}"))
    sent_at: dict[str, float] = {}

    def on_sent(n: int, ts: float) -> None:
        sent_at[f"m-{n}"] = ts

    t = settings.topics
    producer = asyncio.create_task(produce_all(kafka, t.input, records, rate_per_s=rate or None, on_sent=on_sent))
    recent: deque[tuple[str, str, str, float, str, float]] = deque(maxlen=14)
    labels: Counter[str] = Counter()
    latencies: list[float] = []
    dead = 0
    events = 0
    started = time.monotonic()

    def render() -> Table:
        elapsed = max(1e-6, time.monotonic() - started)
        table = Table(
            title=f"emotion.events.v1 - {events} events, {dead} dead letters, {len(records)} sent, "
            f"{events / elapsed:.0f} events/s",
            expand=True,
        )
        for col in ("conversation", "text", "label", "score", "cache", "e2e ms"):
            table.add_column(col, overflow="ellipsis", no_wrap=True)
        for conv, text, label, score, cache, e2e in recent:
            table.add_row(conv, text, label, f"{score:.2f}", cache, f"{e2e:.0f}")
        return table

    async def show(live: Live) -> None:
        nonlocal events, dead
        stream = consume(kafka, [t.events, t.dead_letters], idle_timeout_s=60)
        async with contextlib.aclosing(stream) as incoming:
            async for rec in incoming:
                doc = rec.json()
                if rec.topic == t.dead_letters:
                    dead += 1
                else:
                    events += 1
                    labels[str(doc["label"])] += 1
                    sent = sent_at.get(str(doc["message_id"]))
                    e2e = (rec.received_at - sent) * 1e3 if sent else float("nan")
                    if sent:
                        latencies.append(e2e)
                    cache = doc["cache"]
                    assert isinstance(cache, dict)
                    recent.appendleft(
                        (str(doc["conversation_id"]), texts[int(str(doc["message_id"])[2:])][:70], str(doc["label"]),
                         float(str(doc["score"])), str(cache["level"]), e2e)
                    )  # fmt: skip
                live.update(render())
                if events + dead >= len(records):
                    return

    async def watch() -> None:
        # polled: a thread blocked in proc.wait() would hold asyncio.run's exit until the worker stops,
        # which happens only after it
        while proc.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    with Live(render(), console=console, refresh_per_second=8) as live:
        tasks = [asyncio.create_task(show(live)), asyncio.create_task(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if proc.poll() is not None and events + dead < len(records):
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        return proc.returncode
    await producer
    elapsed = time.monotonic() - started
    summary = Table(title="demo summary")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("messages sent", str(len(records)))
    summary.add_row("events", str(events))
    summary.add_row("dead letters", str(dead))
    summary.add_row("missing", str(len(records) - events - dead))
    summary.add_row("throughput (events/s)", f"{events / elapsed:.1f}")
    if latencies:
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        summary.add_row("end-to-end p50 / p95 / p99 ms", f"{p50:.0f} / {p95:.0f} / {p99:.0f}")
    for label, n in labels.most_common():
        summary.add_row(f"label {label}", str(n))
    console.print(summary)
    return None


def _register_commands() -> None:
    import importlib.util

    from stream_app.model.commands import model

    main.add_command(model)
    # the load-generation and profiling verbs come with the ``perf`` extra (matplotlib draws their plots)
    if importlib.util.find_spec("matplotlib") is not None:
        from stream_app.perf.commands import baseline, profile, replay, sweep_command

        for command in (replay, baseline, profile, sweep_command):
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
