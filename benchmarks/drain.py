"""Worker throughput over Kafka against the same engine standalone, on the same texts, in one run.

The replay benchmark runs its load generator next to the worker, on the same cores. To measure what the
worker itself sustains, this script fills the input topic first, then starts one worker and times how
fast it drains the backlog (events counted from the events topic's end offsets, 10% to 90% of the run,
so model load and warm-up are excluded). In the same run, with the worker stopped, it times the engine
the worker selected on the same unique texts, batched the way the worker batches them (length-grouped,
same token budget), tokenisation included: once one batch at a time on every core, once two batches at
once sharing the cores; the faster is "standalone".

Usage: ``.venv/bin/python benchmarks/drain.py [--messages 6000] [--cache/--no-cache] [--variants a,b]``
(``--variants default,one-batch --rounds 3`` for the comparison in docs/performance.md: each variant's
figure is the median of its rounds, which alternate to share the machine's drift).
Each variant is a worker configuration (``VARIANTS``) draining the same backlog in turn, with its own
consumer group and events topic, so they are compared in one run against one standalone measurement.
Writes ``benchmarks/results/drain-cpu.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_app.devtools.clients import chat_message, produce_all
from stream_app.devtools.kafka_local import free_port, local_kafka
from stream_app.devtools.processes import exit_on_sigterm
from stream_app.devtools.stack import wait_ready, worker_process
from stream_app.settings import load_settings
from stream_app.topics import ensure_topics

RESULTS = Path(__file__).resolve().parent / "results"

# Worker settings per variant (environment overrides on top of the defaults).
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},  # on a CPU: two batches at once, (cores - 1) / 2 intra-op threads each (at least 1)
    "one-batch": {"EMOTION_STREAM_BATCHING__CONCURRENT_BATCHES": "1"},  # the default before: cores - 1 threads
}


async def _count(bootstrap: str, topic: str) -> int:
    # subscribing loads the topic's metadata; nothing is fetched before end_offsets returns
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(parts)
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


def _drain(bootstrap: str, topic: str, total: int, timeout_s: float) -> list[tuple[float, int]]:
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = asyncio.run(_count(bootstrap, topic))
        samples.append((time.monotonic(), n))
        if n >= total:
            break
        time.sleep(0.25)
    return samples


def _rate_between(samples: list[tuple[float, int]], total: int, lo: float = 0.1, hi: float = 0.9) -> float:
    def first_at(share: float) -> tuple[float, int]:
        return next(s for s in samples if s[1] >= share * total)

    (t0, n0), (t1, n1) = first_at(lo), first_at(hi)
    return (n1 - n0) / max(1e-9, t1 - t0)


def _standalone(
    model_path: str, engine_name: str, texts: list[str], settings: Any, concurrency: int = 1
) -> dict[str, Any]:
    """The engine alone: one batch at a time on every core, or ``concurrency`` batches at once sharing them."""
    from concurrent.futures import ThreadPoolExecutor

    from stream_app.batching import Batcher

    from stream_app.inference.base import available_cores
    from stream_app.inference.select import EngineChoice, load_engine
    from stream_app.inference.tokenize import TextEncoder

    m, b = settings.model, settings.batching
    threads = m.num_threads if concurrency == 1 else max(1, available_cores() // concurrency)
    encoder = TextEncoder.from_pretrained(model_path, max_length=m.max_length_tokens)
    engine, _ = load_engine(
        model_path, engine=cast(EngineChoice, engine_name), device="cpu", num_threads=threads,
        cache_dir=settings.data.cache_dir, parity_texts=(), benchmark=False, wrap_fallback=False,
    )  # fmt: skip
    # warm-up on a slice, then time everything: tokenise in chunks as the worker does, batch with its batcher
    encoder.encode(texts[:64])
    engine.predict(encoder.pad(encoder.encode(texts[:32])))
    t0 = time.perf_counter()
    encoded = []
    for i in range(0, len(texts), 256):
        encoded += encoder.encode(texts[i : i + 256])
    batcher: Batcher[int] = Batcher(
        max_batch_size=b.max_batch_size, max_batch_tokens=b.max_batch_tokens, max_wait_s=0.0,
        capacity=len(texts) + 1, group_by_length=b.group_by_length, clock=lambda: 0.0,
    )  # fmt: skip
    for i, enc in enumerate(encoded):
        batcher.add(i, enc.n_tokens)
    groups: list[list[int]] = []
    while len(batcher):
        batch = batcher.take(0.0)
        assert batch is not None
        groups.append(list(batch.items))
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(lambda g: engine.predict(encoder.pad([encoded[i] for i in g])), groups):
            pass
    seconds = time.perf_counter() - t0
    return {
        "engine": engine_name,
        "concurrent_batches": concurrency,
        "threads_per_batch": threads or "all cores",
        "messages_per_s": len(texts) / seconds,
        "batches": len(groups),
        "seconds": seconds,
    }


@click.command()
@click.option("--messages", type=int, default=6000, show_default=True)
@click.option("--cache/--no-cache", default=False, show_default=True, help="Worker caches on (unique texts).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "drain-cpu.json", show_default=True)
@click.option("--variants", default="default", show_default=True, help=f"Comma-separated, of: {', '.join(VARIANTS)}.")
@click.option("--rounds", type=int, default=1, show_default=True, help="Drain each variant this often, interleaved.")
def main(messages: int, cache: bool, out: Path, variants: str, rounds: int) -> None:
    """Fill the input topic, let one worker drain it, then time the same engine standalone."""
    exit_on_sigterm()  # a kill stops the local Kafka and worker as Ctrl-C does
    from stream_app.service import resolve_model_path

    settings = load_settings()
    model_path = resolve_model_path(settings)
    lines = (settings.data.goemotions_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines += (settings.data.goemotions_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(line.split("\t", 1)[0] for line in lines))[:messages]
    t = settings.topics
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp, local_kafka(settings.data.cache_dir) as kafka:
        bootstrap = kafka.bootstrap_servers
        topics = [t.input, t.events, t.metrics, t.dead_letters]
        asyncio.run(ensure_topics(bootstrap, topics, t.partitions))
        records = [chat_message(f"m-{i}", f"c-{i % 500}", text) for i, text in enumerate(texts)]
        asyncio.run(produce_all(bootstrap, t.input, records))
        runs: dict[str, dict[str, Any]] = {}
        engine_name = ""
        names = [v for v in variants.split(",") if v]
        for round_no in range(rounds):
            for name in names:
                tag = f"{name}-{round_no}"
                events = f"{t.events}.{tag}"
                asyncio.run(ensure_topics(bootstrap, [events], t.partitions))
                port = free_port()
                env = {
                    **os.environ,
                    "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                    "EMOTION_STREAM_WORKER__APP_ID": f"drain-{tag}",
                    "EMOTION_STREAM_WORKER__STATE_DIR": f"{tmp}/state-{tag}",
                    "EMOTION_STREAM_TOPICS__EVENTS": events,
                    "EMOTION_STREAM_METRICS__PORT": str(port),
                    "EMOTION_STREAM_MODEL__PATH": model_path,
                    **VARIANTS[name],
                }
                if not cache:
                    env |= {"EMOTION_STREAM_CACHE__L1_ENABLED": "false", "EMOTION_STREAM_CACHE__L2_ENABLED": "false"}
                with worker_process(env, Path(tmp) / f"worker-{tag}.log") as proc:
                    wait_ready(port, proc)
                    samples = _drain(bootstrap, events, len(texts), timeout_s=900)
                    metrics_text = _scrape(port)
                line = next(x for x in metrics_text.splitlines() if x.startswith("emotion_engine_info{"))
                engine_name = line.split('engine="', 1)[1].split('"', 1)[0]
                run = runs.setdefault(name, {"settings": VARIANTS[name], "engine": engine_name, "rates": []})
                run["rates"].append(round(_rate_between(samples, len(texts)), 1))
                click.echo(f"{tag}: {run['rates'][-1]:.1f} messages/s ({engine_name})")
    name = engine_name.replace("-fp32", "")
    alone = [_standalone(model_path, name, texts, settings, concurrency) for concurrency in (1, 2)]
    standalone = max(alone, key=lambda r: r["messages_per_s"])
    for run in runs.values():
        run["messages_per_s"] = statistics.median(run["rates"])
        run["share_of_standalone"] = round(run["messages_per_s"] / standalone["messages_per_s"], 3)
    first = next(iter(runs.values()))
    result = {
        "messages": len(texts),
        "cache": cache,
        "engine": engine_name,
        "worker_messages_per_s": round(first["messages_per_s"], 1),
        "standalone_messages_per_s": round(standalone["messages_per_s"], 1),
        "worker_share_of_standalone": first["share_of_standalone"],
        "variants": runs,
        "standalone": standalone,
        "standalone_runs": alone,
        "loadavg": os.getloadavg(),
        "cpus": os.cpu_count(),
        "command": f"python benchmarks/drain.py --messages {messages} {'--cache' if cache else '--no-cache'} "
        f"--variants {variants} --rounds {rounds}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    click.echo(json.dumps({k: v for k, v in result.items() if k != "standalone"}, indent=2))


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


if __name__ == "__main__":
    main()
