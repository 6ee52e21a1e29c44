"""Produce and collect over the real broker (used by the integration tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stream_app.devtools.clients import Received, consume, produce_all


def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
    asyncio.run(produce_all(bootstrap, topic, records))


def collect(
    bootstrap: str,
    topics: Sequence[str],
    done: Callable[[Received], bool],
    timeout_s: float = 180.0,
) -> list[Received]:
    """Read ``topics`` from the beginning until ``done(record)`` says so (called per record) or the timeout."""

    async def run() -> list[Received]:
        got: list[Received] = []
        deadline = time.monotonic() + timeout_s

        async def loop() -> None:
            async with contextlib.aclosing(consume(bootstrap, topics)) as records:
                async for rec in records:
                    got.append(rec)
                    if done(rec):
                        return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop(), max(1.0, deadline - time.monotonic()))
        return got

    return asyncio.run(run())


class Until:
    """Stop condition: at least ``counts[topic]`` records of each topic (or of distinct message ids)."""

    def __init__(self, counts: dict[str, int], distinct_ids: bool = False) -> None:
        self.counts = counts
        self.distinct_ids = distinct_ids
        self.seen: dict[str, set[object]] = {t: set() for t in counts}

    def __call__(self, rec: Received) -> bool:
        if rec.topic in self.seen:
            key: object = str(rec.json().get("message_id")) if self.distinct_ids else (rec.partition, rec.offset)
            self.seen[rec.topic].add(key)
        return all(len(self.seen[t]) >= n for t, n in self.counts.items())


def dev_texts(data_dir: Path, n: int) -> list[str]:
    lines = (data_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[0] for line in lines[:n]]
