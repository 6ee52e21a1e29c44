"""Run one worker process: checks, health server, model loading in a thread, then Faust until stopped."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import threading
import time

from stream_app.errors import EmotionStreamError
from stream_app.metrics import Metrics
from stream_app.sampler import ResourceSampler
from stream_app.service import Runtime, build_runtime
from stream_app.settings import Settings
from stream_app.worker.app import CONVERSATION_TABLE, Worker, changelog_topic
from stream_app.worker.faust_glue import EmotionWorker, Watchdog
from stream_app.worker.health import Health, HealthServer
from stream_app.worker.startup import prepare

__all__ = ["process_started_at", "run_worker"]

_log = logging.getLogger(__name__)


def process_started_at() -> float:
    """The process's start as a ``time.monotonic()`` reading (interpreter start-up included)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def run_worker(settings: Settings, started_at: float | None = None) -> int:
    """Run until SIGTERM/SIGINT or a fatal error; returns the process exit code (0 on a clean stop)."""
    started_at = process_started_at() if started_at is None else started_at
    # Tens of thousands of short-lived objects per second (a slot, its output, aiokafka's records): the
    # default gen-0 threshold of 700 ran the collector every few hundred messages, about a third of the
    # event loop's time in benchmarks/host_ceiling.py; collecting every 50,000 allocations costs little
    # memory. (Start-up objects are moved out of the collector's way with gc.freeze() once ready.)
    gc.set_threshold(50_000, 50, 100)
    metrics = Metrics()
    metrics.cold_start_seconds.labels("import").set(time.monotonic() - started_at)
    health = Health()
    try:
        settings.worker.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _log.error("cannot create the state folder %s: %s", settings.worker.state_dir, exc.strerror or exc)
        return 2
    server = None
    if settings.metrics.port:
        try:
            server = HealthServer(metrics, health, settings.metrics.host, settings.metrics.port).start()
        except OSError as exc:
            _log.error("cannot serve metrics and probes on %s:%d: %s (METRICS__PORT)", settings.metrics.host,
                       settings.metrics.port, exc.strerror or exc)  # fmt: skip
            return 2
        _log.info("metrics and probes on http://%s:%d (/metrics /livez /readyz)", settings.metrics.host, server.port)
    changelog = changelog_topic(settings) if settings.cache.l2_enabled else None
    states = changelog_topic(settings, CONVERSATION_TABLE) if settings.conversations.enabled else None
    # the model loads on a daemon thread while the broker is checked and Faust joins the group; a stop
    # requested meanwhile does not wait for the load (a thread pool would join it on the way out)
    runtime: concurrent.futures.Future[Runtime] = concurrent.futures.Future()
    threading.Thread(target=_load, args=(runtime, settings, metrics), name="model-load", daemon=True).start()
    code = _run(settings, metrics, health, server, runtime, changelog, states, started_at)
    if not runtime.done():
        _log.warning("stopped while the model was still loading")
        logging.shutdown()
        os._exit(code)  # the load is native code that cannot be interrupted; nothing else is left to do
    return code


def _load(runtime: concurrent.futures.Future[Runtime], settings: Settings, metrics: Metrics) -> None:
    if not runtime.set_running_or_notify_cancel():
        return
    try:
        runtime.set_result(build_runtime(settings, metrics))
    except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits for the runtime
        runtime.set_exception(exc)


def _run(
    settings: Settings,
    metrics: Metrics,
    health: Health,
    server: HealthServer | None,
    runtime: concurrent.futures.Future[Runtime],
    changelog: str | None,
    states: str | None,
    started_at: float,
) -> int:
    try:
        partitions, action = asyncio.run(prepare(settings, changelog, states))
    except EmotionStreamError as exc:
        _log.error("%s", exc)
        if server is not None:
            server.stop()
        return 2
    if action == "recreated":
        metrics.l2_rebuilds_total.labels("partitions").inc()
    watchdog = Watchdog(settings.worker.shutdown_timeout_s)
    worker = Worker(
        settings=settings,
        metrics=metrics,
        health=health,
        input_partitions=partitions,
        runtime=runtime,
        watchdog=watchdog,
        started_at=started_at,
    )
    faust_worker = EmotionWorker(
        worker.app, loglevel=settings.worker.log_level.upper(), quiet=True, override_logging=False
    )
    faust_worker.on_stop_signal = worker.on_stop_signal
    if server is not None and settings.conversations.enabled:
        server.add_route(r"/conversations/(?P<id>[^/]+)", worker.conversation_route)
    # CPU, memory and (with pynvml) GPU gauges, sampled on a daemon thread off the hot path
    sampler = ResourceSampler(metrics, settings.metrics.profile_sample_interval_s)
    sampler.start()
    code = 0
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sampler.stop()
        if server is not None:
            server.stop()
    code = max(code, watchdog.exit_code)
    watchdog.cancel()
    return code
