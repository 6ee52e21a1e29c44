"""The replay tool against a real broker and a real worker (and the naive baseline): nothing unaccounted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_app.devtools.kafka_local import free_port
from stream_app.perf.profile import SHARE_STAGES, build_profile
from stream_app.perf.replay import build_corpus, load_texts, run_replay, write_report
from tests.integration.conftest import make_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_replay_accounts_for_every_message(kafka: Any, spawn_worker: Any, data_dir: Path, tmp_path: Path) -> None:
    topics = make_topics(kafka, partitions=4)
    worker = spawn_worker(topics)
    corpus = build_corpus(load_texts("dev", data_dir), 200, repeat_share=0.4, malformed_share=0.05,
                          conversations=20, seed=21)  # fmt: skip
    n_bad = sum(m.malformed for m in corpus.messages)
    assert n_bad == 10
    worker.wait_ready()
    group = worker.env["EMOTION_STREAM_WORKER__APP_ID"]
    report = asyncio.run(
        run_replay(kafka.bootstrap_servers, topics, corpus, 100.0, group, 240.0, progress=False, producers=4,
                   linger_s=3.0)
    )  # fmt: skip
    assert report.completed, (report.missing_ids, worker.log_tail())
    assert report.missing == 0
    assert report.sent == report.acked == 200
    assert report.dead_letters == n_bad
    assert report.dead_letters_by_reason == corpus.expected_dead_letters()
    assert report.unexpected_dead_letters == 0 and report.reason_mismatches == 0
    assert report.unique_events == 200 - n_bad
    assert report.duplicate_events == 0 and report.duplicate_event_ids == 0
    assert report.order_violations == 0 and report.source_mismatches == 0
    # 80 messages repeat 20-odd popular texts: most are answered from a cache level
    assert report.cache_hit_rate > 0.2
    assert report.lag_samples, "the worker's group lag was never sampled"
    assert report.final_lag == 0
    # stage metrics: one record per batch, the batch sizes add up to the inferred messages
    assert report.batches > 0
    assert sum(int(r["size"]) for r in report.stage_records) == report.cache_levels.get("none", 0)
    assert report.latency_ms["p50"] > 0

    json_path, png_path = write_report(report, tmp_path / "replay-it")
    assert json_path.exists() and png_path.exists()
    prof = build_profile(report.stage_records, report.event_samples, report.resource_samples, report)
    assert prof.bottleneck in SHARE_STAGES
    assert prof.events == report.unique_events


def test_baseline_accounts_for_every_message(kafka: Any, model_path: str, data_dir: Path, tmp_path: Path) -> None:
    topics = make_topics(kafka, partitions=2)
    port = free_port()
    env = {
        **os.environ,
        **topics.env(),
        "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "EMOTION_STREAM_WORKER__APP_ID": "replay-baseline-test",
        "EMOTION_STREAM_METRICS__PORT": str(port),
        "EMOTION_STREAM_MODEL__PATH": model_path,
        "EMOTION_STREAM_MODEL__NUM_THREADS": "1",
    }
    log = (tmp_path / "baseline.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_app.perf.commands", "baseline"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        corpus = build_corpus(load_texts("dev", data_dir), 60, repeat_share=0.3, malformed_share=0.1,
                              conversations=6, seed=22)  # fmt: skip
        report = asyncio.run(
            run_replay(kafka.bootstrap_servers, topics, corpus, None, "replay-baseline-test-baseline", 240.0,
                       progress=False, linger_s=2.0)
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    tail = (tmp_path / "baseline.log").read_text(errors="replace")[-3000:]
    assert report.completed, tail
    assert report.dead_letters_by_reason == corpus.expected_dead_letters()
    assert report.unique_events == 54
    assert report.cache_levels == {"none": 54}
    assert report.duplicate_events == 0
    assert report.final_lag == 0
