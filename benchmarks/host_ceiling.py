"""Host ceiling: how fast the worker's host path drains Kafka when inference is free, against a reference.

Each round runs every variant in turn (A, B, A, B...) on the same machine:

* ``worker``: the real worker process (Faust, the core pipeline, the real tokenizer, the aiokafka sink)
  with a zero-cost engine injected by ``benchmarks/host/free_engine_worker.py`` (not a product setting);
* ``worker2``: two such processes in one consumer group, sharing the input's partitions;
* ``reference``: ``benchmarks/host/reference_consumer.py``, a plain aiokafka consumer doing the same job;
* ``main``: with ``--main-ref REF``, the worker of that git revision (e.g. today's ``main`` before this
  change), run from a temporary worktree, for before/after comparisons (``--engine real`` for both).

A variant's consumers start on an empty input topic of their own; once every one holds partitions, the
benchmark produces ``--messages`` unique chat messages (GoEmotions train texts) into it as fast as it can,
and follows the output topic's end offsets. Reported per round: messages/s between 5% and 95% of the
outputs, the event loop's CPU (the process's main thread, from /proc) per message over that window, the
whole process's CPU per message, batch fill (mean batch size and share of batches closed on a cap, from
the worker's stage metrics) and the machine's 1-minute load average. Medians with min-max over rounds.

Usage: ``.venv/bin/python benchmarks/host_ceiling.py [--messages 30000] [--rounds 3]
[--variants worker,reference,worker2] [--engine free|real] [--main-ref REF]``. Writes
``benchmarks/results/host-ceiling[-<engine>].json`` and prints a table.
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
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_app.devtools.kafka_local import free_port, local_kafka
from stream_app.devtools.processes import exit_on_sigterm, terminate
from stream_app.service import resolve_model_path
from stream_app.settings import load_settings
from stream_app.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOST = ROOT / "benchmarks" / "host"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    variant: str
    round: int
    messages: int
    msgs_per_s: float
    loop_cpu_us_per_msg: float
    process_cpu_us_per_msg: float
    load_1m: float
    mean_batch_size: float | None = None
    batches_closed_on_cap: float | None = None
    processes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(main thread, whole process) CPU ticks (user + system) of ``pid``."""

    def ticks(path: str) -> int:
        with open(path, "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    return ticks(f"/proc/{pid}/task/{pid}/stat"), ticks(f"/proc/{pid}/stat")


def _texts(n: int) -> list[str]:
    data = load_settings().data.goemotions_dir
    seen: dict[str, None] = {}
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        path = data / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.split("\t", 1)[0].strip()
            if text:
                seen.setdefault(text, None)
            if len(seen) >= n:
                return list(seen)
    base = list(seen)
    # fewer unique texts than asked: make them unique by numbering (still realistic lengths)
    return [f"{base[i % len(base)]} #{i}" for i in range(n)]


def _records(texts: list[str]) -> list[tuple[bytes, bytes]]:
    out = []
    for i, text in enumerate(texts):
        conv = f"c-{i % 997}"
        doc = {
            "message_id": f"m-{i}",
            "conversation_id": conv,
            "user_id": f"u-{i % 101}",
            "text": text,
            "sent_at": "2026-11-30T10:00:00.000Z",
        }
        out.append((conv.encode(), orjson.dumps(doc)))
    return out


async def _fill(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], partitions: int) -> None:
    from aiokafka.partitioner import murmur2

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=512 * 1024, linger_ms=5)
    await producer.start()
    try:
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in records:
            by_partition.setdefault((murmur2(key) & 0x7FFFFFFF) % partitions, []).append((key, value))
        futures = []
        for p, recs in by_partition.items():
            batch = producer.create_batch()
            for key, value in recs:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=p))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            futures.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _follow(
    bootstrap: str, topic: str, total: int, pids: list[int], timeout_s: float, sent: dict[str, float] | None = None
) -> tuple[list[tuple[float, int, int, int]], list[float]]:
    """Read ``topic`` (read_committed, as downstream consumers do) until ``total`` records arrived or the
    timeout. Returns samples (time, outputs, main-thread ticks, process ticks) taken at every poll, and,
    when ``sent`` maps message ids to their send times, each message's end-to-end latency in seconds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    samples: list[tuple[float, int, int, int]] = []
    latencies: list[float] = []
    n = 0
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and n < total:
            got = await consumer.getmany(timeout_ms=50, max_records=10_000)
            now = time.monotonic()
            for records in got.values():
                n += len(records)
                if sent is not None:
                    for r in records:
                        t = sent.get(orjson.loads(r.value)["message_id"])
                        if t is not None:
                            latencies.append(time.time() - t)
            loop_ticks = proc_ticks = 0
            for pid in pids:
                a, b = _cpu_ticks(pid)
                loop_ticks += a
                proc_ticks += b
            samples.append((now, n, loop_ticks, proc_ticks))
    finally:
        await consumer.stop()
    return samples, latencies


def _window(
    samples: list[tuple[float, int, int, int]], total: int, lo: float = 0.05, hi: float = 0.95
) -> tuple[float, float, float]:
    """(messages/s, loop CPU µs/msg, process CPU µs/msg) between ``lo`` and ``hi`` of the outputs."""
    first = next(s for s in samples if s[1] >= lo * total)
    last = next(s for s in samples if s[1] >= hi * total)
    msgs = last[1] - first[1]
    secs = last[0] - first[0]
    if msgs <= 0 or secs <= 0:
        raise RuntimeError(f"no progress to measure: {first} .. {last}")
    tick_us = 1e6 / CLK_TCK
    return msgs / secs, (last[2] - first[2]) * tick_us / msgs, (last[3] - first[3]) * tick_us / msgs


def _metrics_ready(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            body = resp.read().decode()
    except OSError:
        return 0.0
    for line in body.splitlines():
        if line.startswith("emotion_assigned_partitions "):
            return float(line.split()[1])
    return 0.0


def _batch_fill(bootstrap: str, topic: str, max_batch_size: int) -> tuple[float | None, float | None]:
    async def read() -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        docs: list[dict[str, Any]] = []
        try:
            while True:
                got = await consumer.getmany(timeout_ms=1000)
                if not got:
                    return docs
                for records in got.values():
                    docs.extend(orjson.loads(r.value) for r in records)
        finally:
            await consumer.stop()

    docs = asyncio.run(read())
    if not docs:
        return None, None
    sizes = [d["size"] for d in docs]
    capped = sum(1 for d in docs if d["closed_reason"] in ("size", "tokens"))
    return statistics.fmean(sizes), capped / len(docs)


def _main_worktree(ref: str) -> Path:
    folder = Path(tempfile.gettempdir()) / f"emotion-stream-{ref}"
    if not (folder / "stream_app").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref], check=True, capture_output=True
        )
    return folder


# A variant's worker settings on top of the benchmark's (``name[-option...][2]``: 2 = two processes)
OPTIONS: dict[str, dict[str, str]] = {
    "conv": {"EMOTION_STREAM_CONVERSATIONS__ENABLED": "true"},
    "eos": {"EMOTION_STREAM_WORKER__DELIVERY": "exactly_once"},
    "cache": {"EMOTION_STREAM_CACHE__L1_ENABLED": "true", "EMOTION_STREAM_CACHE__L2_ENABLED": "true"},
    "batch1": {"EMOTION_STREAM_BATCHING__CONCURRENT_BATCHES": "1"},  # one batch in flight (CPU default: 2)
}


def _parse(variant: str) -> tuple[str, dict[str, str], int]:
    """``worker-eos2`` -> (``worker``, the eos settings, 2 processes)."""
    n_proc = 2 if variant.endswith("2") else 1
    base, *options = variant.rstrip("2").split("-")
    env: dict[str, str] = {}
    for option in options:
        env.update(OPTIONS[option])
    return base, env, n_proc


def _run_variant(
    variant: str,
    rnd: int,
    bootstrap: str,
    records: list[tuple[bytes, bytes]],
    partitions: int,
    engine: str,
    main_ref: str | None,
    work: Path,
    extra_env: dict[str, str],
    rate: float | None = None,
) -> Round:
    tag = uuid.uuid4().hex[:8]
    names = ("input", "events", "metrics", "dlq", "conversations", "alerts")
    topics = {k: f"bench.{k}.{tag}" for k in names}
    asyncio.run(ensure_topics(bootstrap, list(topics.values()), partitions))
    group = f"bench-{variant}-{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    ports: list[int] = []
    base, option_env, n_proc = _parse(variant)
    try:
        for i in range(n_proc):
            log = work / f"{variant}-{rnd}-{i}.log"
            logs.append(log)
            port = free_port()
            ports.append(port)
            env = {
                **os.environ,
                "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "EMOTION_STREAM_WORKER__APP_ID": group,
                "EMOTION_STREAM_WORKER__WORKER_ID": f"{variant}-{i}",
                "EMOTION_STREAM_WORKER__STATE_DIR": str(work / f"state-{tag}-{i}"),
                "EMOTION_STREAM_METRICS__PORT": str(port),
                "EMOTION_STREAM_TOPICS__INPUT": topics["input"],
                "EMOTION_STREAM_TOPICS__EVENTS": topics["events"],
                "EMOTION_STREAM_TOPICS__METRICS": topics["metrics"],
                "EMOTION_STREAM_TOPICS__DEAD_LETTERS": topics["dlq"],
                "EMOTION_STREAM_TOPICS__CONVERSATIONS": topics["conversations"],
                "EMOTION_STREAM_TOPICS__ALERTS": topics["alerts"],
                "EMOTION_STREAM_TOPICS__PARTITIONS": str(partitions),
                # the host path as issue 11 defines it: no result caches, no conversation state
                "EMOTION_STREAM_CACHE__L1_ENABLED": "false",
                "EMOTION_STREAM_CACHE__L2_ENABLED": "false",
                "EMOTION_STREAM_CONVERSATIONS__ENABLED": "false",
                "PYTHONUNBUFFERED": "1",
                **extra_env,
                **option_env,
            }
            if base == "reference":
                cmd = [
                    sys.executable,
                    str(HOST / "reference_consumer.py"),
                    "--bootstrap",
                    bootstrap,
                    "--topic",
                    topics["input"],
                    "--events",
                    topics["events"],
                    "--group",
                    group,
                    "--expect",
                    str(len(records) // n_proc),
                ]
                if engine == "real":
                    cmd.append("--real-engine")
                cwd = ROOT
            elif base == "main":
                assert main_ref is not None
                cwd = _main_worktree(main_ref)
                for key in ("TOPICS__CONVERSATIONS", "TOPICS__ALERTS", "CONVERSATIONS__ENABLED"):  # unknown there
                    env.pop(f"EMOTION_STREAM_{key}", None)
                env.setdefault("EMOTION_STREAM_MODEL__PATH", resolve_model_path(load_settings()))
                cmd = [sys.executable, "-m", "stream_app.cli", "worker"]
            else:
                cmd = [sys.executable, str(HOST / "free_engine_worker.py")]
                if engine == "real":
                    cmd.append("--real-engine")
                cwd = ROOT
            with log.open("wb") as fh:
                procs.append(
                    subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                )
        # every consumer holds partitions before the messages arrive
        deadline = time.monotonic() + 180
        if base == "reference":
            time.sleep(8.0)  # it starts consuming at once; the tokenizer and engine load take a few seconds
        else:
            while sum(_metrics_ready(p) for p in ports) < partitions:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{variant} did not get ready:\n" + logs[0].read_text(errors="replace")[-3000:])
                time.sleep(0.2)
            time.sleep(1.0)
        sent: dict[str, float] | None = None
        if rate is None:
            asyncio.run(_fill(bootstrap, topics["input"], records, partitions))
        else:
            sent = {}
            filler = threading.Thread(
                target=_paced, args=(bootstrap, topics["input"], records, rate, sent), daemon=True
            )
            filler.start()
        samples, latencies = asyncio.run(
            _follow(bootstrap, topics["events"], len(records), [p.pid for p in procs], 600, sent)
        )
        if samples[-1][1] < len(records):
            raise RuntimeError(
                f"{variant}: only {samples[-1][1]} of {len(records)} outputs:\n"
                + logs[0].read_text(errors="replace")[-3000:]
            )
        rate_s, loop_us, proc_us = _window(samples, len(records))
        load = os.getloadavg()[0]
    finally:
        for p in procs:
            terminate(p, 20)
    fill, capped = (None, None)
    if base != "reference":
        fill, capped = _batch_fill(bootstrap, topics["metrics"], 64)
    extra: dict[str, Any] = {}
    if latencies:
        p50, p99 = statistics.quantiles(latencies, n=100)[49], statistics.quantiles(latencies, n=100)[98]
        extra = {"latency_p50_ms": p50 * 1e3, "latency_p99_ms": p99 * 1e3, "offered_msgs_per_s": rate}
    return Round(
        variant,
        rnd,
        len(records),
        rate_s,
        loop_us / n_proc if n_proc > 1 else loop_us,
        proc_us,
        load,
        fill,
        capped,
        n_proc,
        extra,
    )


def _paced(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], rate: float, sent: dict[str, float]) -> None:
    """Produce ``records`` at ``rate`` per second, noting each message's send time (wall clock)."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
        await producer.start()
        try:
            start = time.monotonic()
            for n, (key, value) in enumerate(records):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[orjson.loads(value)["message_id"]] = time.time()
                await producer.send(topic, value=value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


def _summary(rows: list[Round]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r.variant for r in rows):
        mine = [r for r in rows if r.variant == variant]

        def stat(values: list[float]) -> dict[str, float]:
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        out[variant] = {
            "msgs_per_s": stat([r.msgs_per_s for r in mine]),
            "loop_cpu_us_per_msg": stat([r.loop_cpu_us_per_msg for r in mine]),
            "process_cpu_us_per_msg": stat([r.process_cpu_us_per_msg for r in mine]),
            "load_1m": stat([r.load_1m for r in mine]),
        }
        fills = [r.mean_batch_size for r in mine if r.mean_batch_size is not None]
        caps = [r.batches_closed_on_cap for r in mine if r.batches_closed_on_cap is not None]
        if fills:
            out[variant]["mean_batch_size"] = stat(fills)
            out[variant]["batches_closed_on_cap"] = stat(caps)
        for key in ("latency_p50_ms", "latency_p99_ms"):
            values = [r.extra[key] for r in mine if key in r.extra]
            if values:
                out[variant][key] = stat(values)
    return out


@click.command()
@click.option("--messages", type=int, default=30_000, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--partitions", type=int, default=4, show_default=True)
@click.option(
    "--variants",
    default="worker,reference",
    show_default=True,
    help="worker, reference or main, with options -conv (conversation state), -eos (exactly-once), -cache "
    "(L1+L2), -batch1 (one batch in flight), and a trailing 2 for two processes: e.g. worker,worker-eos,worker2",
)
@click.option(
    "--rate",
    type=float,
    default=None,
    help="Latency mode: produce the messages at this rate (msg/s) and report end-to-end latency percentiles",
)
@click.option("--engine", type=click.Choice(["free", "real"]), default="free", show_default=True)
@click.option("--main-ref", default=None, help="git revision whose worker is the 'main' variant")
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE worker setting for every variant")
@click.option("--out", type=click.Path(path_type=Path), default=None)
def main(
    messages: int,
    rounds: int,
    partitions: int,
    variants: str,
    engine: str,
    main_ref: str | None,
    env_pairs: tuple[str, ...],
    rate: float | None,
    out: Path | None,
) -> None:
    exit_on_sigterm()
    names = [v.strip() for v in variants.split(",") if v.strip()]
    extra_env = dict(pair.split("=", 1) for pair in env_pairs)
    resolve_model_path(load_settings())  # fail early without a model
    records = _records(_texts(messages))
    rows: list[Round] = []
    work = Path(tempfile.mkdtemp(prefix="host-ceiling-"))
    try:
        with local_kafka(load_settings().data.cache_dir, work / "kafka", heap_mb=768) as kafka:
            for rnd in range(rounds):
                order = names if rnd % 2 == 0 else list(reversed(names))
                for variant in order:
                    row = _run_variant(
                        variant,
                        rnd,
                        kafka.bootstrap_servers,
                        records,
                        partitions,
                        engine,
                        main_ref,
                        work,
                        extra_env,
                        rate,
                    )
                    rows.append(row)
                    print(
                        f"round {rnd} {variant:10s} {row.msgs_per_s:8.0f} msg/s  loop {row.loop_cpu_us_per_msg:6.1f} "
                        f"us/msg  process {row.process_cpu_us_per_msg:6.1f} us/msg  fill {row.mean_batch_size} "
                        f"load {row.load_1m:.2f} {row.extra}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = _summary(rows)
    print("\nvariant     msgs/s median (min-max)      loop us/msg     process us/msg   batch fill   load")
    for variant, s in summary.items():
        m = s["msgs_per_s"]
        fill = s.get("mean_batch_size", {}).get("median")
        print(
            f"{variant:10s} {m['median']:8.0f} ({m['min']:.0f}-{m['max']:.0f})   "
            f"{s['loop_cpu_us_per_msg']['median']:8.1f}      {s['process_cpu_us_per_msg']['median']:8.1f}      "
            f"{fill if fill is None else round(fill, 1)!s:>8}   {s['load_1m']['median']:.2f}"
        )
        if "latency_p50_ms" in s:
            p50, p99 = s["latency_p50_ms"], s["latency_p99_ms"]
            print(
                f"{'':10s} end-to-end p50 {p50['median']:.1f} ms ({p50['min']:.1f}-{p50['max']:.1f}), "
                f"p99 {p99['median']:.1f} ms ({p99['min']:.1f}-{p99['max']:.1f})"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = out or RESULTS / (f"host-ceiling-{engine}.json" if rate is None else f"latency-{engine}-{rate:g}.json")
    target.write_text(
        json.dumps(
            {
                "messages": messages,
                "rounds": rounds,
                "partitions": partitions,
                "engine": engine,
                "main_ref": main_ref,
                "rate": rate,
                "env": extra_env,
                "cpus": os.cpu_count(),
                "summary": summary,
                "rounds_detail": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )
    print(f"\nwrote {target}")


if __name__ == "__main__":
    main()
