"""Cold start: from ``emotion-stream worker`` to the event of a message already waiting in the input.

Each round produces one chat message into a fresh input topic, launches a worker (a fresh consumer group
and state folder: nothing to recover), and times, from the launch, the worker's own start-up phases
(``emotion_cold_start_seconds{phase}`` from its /metrics) and the arrival of the message's event on the
events topic. Two variants alternate (A, B, A, B...):

* ``restart``: the engine selection cached for this model, host and library versions (as after any earlier
  start on the machine: a crashed or rescheduled worker);
* ``first``: that cache removed (the first start on a new host: the full selection with its parity runs).

Usage: ``.venv/bin/python benchmarks/cold_start.py [--rounds 5]``. Prints medians (min-max) and writes
``benchmarks/results/cold-start.json``. The local broker starts once; it is not part of the timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer

from stream_app.devtools.clients import chat_message, produce_all
from stream_app.devtools.kafka_local import free_port, local_kafka
from stream_app.devtools.processes import exit_on_sigterm, terminate
from stream_app.settings import load_settings
from stream_app.topics import ensure_topics

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("import", "engine_import", "engine_load", "warmup", "ready", "first_chunk")


async def _first_event(bootstrap: str, topic: str, timeout_s: float) -> float | None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=20)
            if any(got.values()):
                return time.monotonic()
        return None
    finally:
        await consumer.stop()


def _phases(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith('emotion_cold_start_seconds{phase="'):
            phase = line.split('"')[1]
            out[phase] = float(line.rsplit(" ", 1)[1])
    return out


def _round(variant: str, bootstrap: str, work: Path, cache_dir: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    names = {k: f"cold.{k}.{tag}" for k in ("input", "events", "metrics", "dlq", "conversations", "alerts")}
    asyncio.run(ensure_topics(bootstrap, list(names.values()), 4))
    key, value = chat_message("m-1", "c-1", "I am so happy and grateful, this is wonderful!")
    asyncio.run(produce_all(bootstrap, names["input"], [(key, value)]))
    if variant == "first":
        shutil.rmtree(cache_dir / "engine-selection", ignore_errors=True)
    port = free_port()
    env = {
        **os.environ,
        "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "EMOTION_STREAM_WORKER__APP_ID": f"cold-{tag}",
        "EMOTION_STREAM_WORKER__STATE_DIR": str(work / f"state-{tag}"),
        "EMOTION_STREAM_METRICS__PORT": str(port),
        "EMOTION_STREAM_TOPICS__INPUT": names["input"],
        "EMOTION_STREAM_TOPICS__EVENTS": names["events"],
        "EMOTION_STREAM_TOPICS__METRICS": names["metrics"],
        "EMOTION_STREAM_TOPICS__DEAD_LETTERS": names["dlq"],
        "EMOTION_STREAM_TOPICS__CONVERSATIONS": names["conversations"],
        "EMOTION_STREAM_TOPICS__ALERTS": names["alerts"],
    }
    log = work / f"{variant}-{tag}.log"
    with log.open("wb") as fh:
        launched = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        arrived = asyncio.run(_first_event(bootstrap, names["events"], timeout_s=120))
        time.sleep(1.5)  # the ready gauge is set by a 1 s timer
        phases = _phases(port)
    finally:
        terminate(proc, 20)
    if arrived is None:
        raise RuntimeError(f"no event within 120 s:\n{log.read_text(errors='replace')[-3000:]}")
    return {"variant": variant, "first_event_s": arrived - launched, "phases": phases, "load_1m": os.getloadavg()[0]}


@click.command()
@click.option("--rounds", type=int, default=5, show_default=True)
def main(rounds: int) -> None:
    exit_on_sigterm()
    settings = load_settings()
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    try:
        with local_kafka(settings.data.cache_dir, work / "kafka") as kafka:
            _round("restart", kafka.bootstrap_servers, work, settings.data.cache_dir)  # fills the caches once
            for r in range(rounds):
                for variant in ("restart", "first") if r % 2 == 0 else ("first", "restart"):
                    row = _round(variant, kafka.bootstrap_servers, work, settings.data.cache_dir)
                    rows.append(row)
                    print(f"{variant:8s} first event {row['first_event_s']:.2f} s  phases {row['phases']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for variant in ("restart", "first"):
        mine = [r for r in rows if r["variant"] == variant]
        first = [r["first_event_s"] for r in mine]
        summary[variant] = {
            "first_event_s": {"median": statistics.median(first), "min": min(first), "max": max(first)},
            "phases_median_s": {
                p: statistics.median(r["phases"][p] for r in mine if p in r["phases"])
                for p in PHASES
                if any(p in r["phases"] for r in mine)
            },
            "load_1m_median": statistics.median(r["load_1m"] for r in mine),
        }
    print("\nvariant   first event median (min-max)   phases (median s)")
    for variant, s in summary.items():
        f = s["first_event_s"]
        print(f"{variant:8s}  {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}) s   {s['phases_median_s']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cold-start.json"
    out.write_text(json.dumps({"rounds": rounds, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
