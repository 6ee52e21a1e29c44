"""End-to-end throughput with the cache on and off, at 0%, 50% and 90% repeated texts (Zipf).

Runs ``emotion-stream replay`` (local Kafka + one worker, unpaced burst) once per cell, on the same corpus
per repeat share, and prints a table; the per-run reports go to ``benchmarks/results/cache-replay-*.json``
and the summary to ``benchmarks/results/cache-throughput.json``.

Usage: ``.venv/bin/python benchmarks/cache_throughput.py [--messages 3000]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results"
OFF = {"EMOTION_STREAM_CACHE__L1_ENABLED": "false", "EMOTION_STREAM_CACHE__L2_ENABLED": "false"}


@click.command()
@click.option("--messages", type=int, default=3000, show_default=True)
def main(messages: int) -> None:
    rows = []
    for repeat in (0.0, 0.5, 0.9):
        for cache in (True, False):
            name = f"cache-replay-r{int(repeat * 100)}-{'on' if cache else 'off'}"
            env = {**os.environ, **({} if cache else OFF)}
            cmd = [
                sys.executable, "-m", "stream_app.cli", "replay", "--messages", str(messages), "--rate", "0",
                "--repeat", str(repeat), "--malformed", "0", "--no-progress", "--out", str(RESULTS / name),
            ]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            report = json.loads((RESULTS / f"{name}.json").read_text())
            rows.append(
                {
                    "repeat_share": repeat,
                    "cache": "on" if cache else "off",
                    "events_per_s": round(report["throughput_events_per_s"], 1),
                    "p99_ms": round(report["latency_ms"]["p99"], 1),
                    "hit_rate": round(report["cache_hit_rate"], 3),
                    "missing": report["missing"],
                }
            )
            click.echo(json.dumps(rows[-1]))
    unique = next(r["events_per_s"] for r in rows if r["repeat_share"] == 0.0 and r["cache"] == "on")
    for r in rows:
        r["vs_unique_cache_on"] = round(r["events_per_s"] / unique, 2) if unique and r["events_per_s"] else None
    (RESULTS / "cache-throughput.json").write_text(json.dumps({"messages": messages, "rows": rows}, indent=2))
    click.echo("\n| repeats | cache | events/s | x unique | p99 ms | hit rate |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        click.echo(
            f"| {r['repeat_share']:.0%} | {r['cache']} | {r['events_per_s']} | {r['vs_unique_cache_on']} | "
            f"{r['p99_ms']} | {r['hit_rate']} |"
        )


if __name__ == "__main__":
    main()
