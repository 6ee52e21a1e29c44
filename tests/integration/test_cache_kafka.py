"""The L2 cache over a real broker: restarts, rebuilds from the changelog, expiry, two workers, model change."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_app.devtools.clients import chat_message
from tests.integration.conftest import Topics, make_topics
from tests.integration.helpers import Until, collect, dev_texts, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# L1 off so every hit in these tests comes from the RocksDB table; admit on first sight
L2_ONLY = {
    "EMOTION_STREAM_CACHE__L1_ENABLED": "false",
    "EMOTION_STREAM_CACHE__ADMISSION": "always",
    "EMOTION_STREAM_MODEL__ENGINE": "torch",
}


def _round(kafka: Any, topics: Topics, texts: list[str], start: int, seen: int) -> dict[str, dict[str, Any]]:
    """Produce ``texts`` as messages ``m-start...`` and return their events by message id."""
    records = [chat_message(f"m-{start + i}", f"c-{i % 13}", t) for i, t in enumerate(texts)]
    produce(kafka.bootstrap_servers, topics.input, records)
    got = collect(kafka.bootstrap_servers, [topics.events], Until({topics.events: seen + len(texts)}, True), 240)
    by_id = {str(r.json()["message_id"]): r.json() for r in got}
    wanted = {f"m-{start + i}" for i in range(len(texts))}
    assert wanted <= set(by_id), f"missing {len(wanted - set(by_id))} events"
    return {k: v for k, v in by_id.items() if k in wanted}


def _levels(events: dict[str, dict[str, Any]]) -> list[str]:
    return [str(e["cache"]["level"]) for e in events.values()]


def _scores_by_text(events: dict[str, dict[str, Any]], texts: list[str], start: int) -> dict[str, Any]:
    return {texts[int(mid[2:]) - start]: e["scores"] for mid, e in events.items()}


def test_restart_and_rebuild_serve_hits_from_the_restored_table(
    kafka: Any, spawn_worker: Any, data_dir: Path, tmp_path: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    texts = list(dict.fromkeys(dev_texts(data_dir, 80)))[:60]
    state = tmp_path / "state-a"
    first = spawn_worker(topics, name="a", state_dir=state, **L2_ONLY)
    first.wait_ready()
    miss = _round(kafka, topics, texts, 0, 0)
    assert set(_levels(miss)) == {"none"}
    first.stop()

    # 1. restart on the same local state
    second = spawn_worker(topics, name="b", state_dir=state, **L2_ONLY)
    second.wait_ready()
    again = _round(kafka, topics, texts, 1000, len(texts))
    assert set(_levels(again)) == {"l2"}, _levels(again)
    assert _scores_by_text(again, texts, 1000) == _scores_by_text(miss, texts, 0)
    second.stop()

    # 2. rebuild: local state wiped, the table comes back from its changelog topic
    shutil.rmtree(state)
    third = spawn_worker(topics, name="c", state_dir=tmp_path / "state-fresh", **L2_ONLY)
    third.wait_ready()
    rebuilt = _round(kafka, topics, texts, 2000, 2 * len(texts))
    assert set(_levels(rebuilt)) == {"l2"}, _levels(rebuilt)
    assert _scores_by_text(rebuilt, texts, 2000) == _scores_by_text(miss, texts, 0)


def test_expired_entries_are_dropped_and_stay_dropped_after_a_rebuild(
    kafka: Any, spawn_worker: Any, data_dir: Path, tmp_path: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    texts = list(dict.fromkeys(dev_texts(data_dir, 40)))[:30]
    short = {**L2_ONLY, "EMOTION_STREAM_CACHE__L2_TTL_S": "3", "EMOTION_STREAM_CACHE__SWEEP_INTERVAL_S": "1"}
    first = spawn_worker(topics, name="a", state_dir=tmp_path / "a", **short)
    first.wait_ready()
    assert set(_levels(_round(kafka, topics, texts, 0, 0))) == {"none"}
    time.sleep(6)  # past the TTL and several sweeps: tombstones are in the changelog
    # an expired value is never served, before or after the rebuild
    assert set(_levels(_round(kafka, topics, texts, 1000, len(texts)))) == {"none"}
    first.stop()
    time.sleep(6)
    fresh = spawn_worker(topics, name="b", state_dir=tmp_path / "b", **short)
    fresh.wait_ready()
    assert set(_levels(_round(kafka, topics, texts, 2000, 2 * len(texts)))) == {"none"}


def test_two_workers_share_partitions_and_never_serve_another_texts_result(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    topics = make_topics(kafka, partitions=4)
    pool = list(dict.fromkeys(dev_texts(data_dir, 120)))[:100]
    repeats = [pool[(i * 7) % len(pool)] for i in range(500)]  # every text 5 more times, other conversations
    texts = pool + repeats
    env = {"EMOTION_STREAM_MODEL__ENGINE": "torch", "EMOTION_STREAM_CACHE__ADMISSION": "always"}
    w1 = spawn_worker(topics, name="w1", **env)
    w2 = spawn_worker(topics, name="w2", **env)
    w1.wait_ready()
    w2.wait_ready()
    time.sleep(3)  # both in the group before the load
    first = _round(kafka, topics, pool, 0, 0)
    second = _round(kafka, topics, repeats, len(pool), len(pool))
    events = {**first, **second}
    by_text: dict[str, list[list[float]]] = {}
    for mid, e in events.items():
        text = texts[int(mid[2:])]
        by_text.setdefault(text, []).append(list(e["scores"].values()))
        assert e["label"] == max(e["scores"], key=e["scores"].get)
    # Two misses of one text in different batches differ only by float noise (other padding, other BLAS
    # blocking); another text's answer differs by orders of magnitude more.
    for text, answers in by_text.items():
        spread = np.ptp(np.asarray(answers), axis=0).max()
        assert spread < 1e-4, (text, spread)
    distinct = [np.asarray(a[0]) for a in by_text.values()]
    assert min(np.abs(a - b).max() for a, b in itertools.pairwise(distinct)) > 1e-4
    # the repeats found answers cached by the first round (process-wide L1, or the partition's L2)
    assert sum(level in ("l1", "l2") for level in _levels(second)) > len(repeats) // 4, _levels(second)
    for worker in (w1, w2):  # both took a share of the partitions
        served = [line for line in worker.scrape().splitlines() if line.startswith("emotion_events_total ")]
        assert served and float(served[0].split()[1]) > 0, worker.log_tail()


def test_a_model_change_never_serves_the_old_models_answer(
    kafka: Any, spawn_worker: Any, data_dir: Path, tmp_path: Path
) -> None:
    topics = make_topics(kafka, partitions=2)
    texts = list(dict.fromkeys(dev_texts(data_dir, 40)))[:30]
    state = tmp_path / "state"
    torch_worker = spawn_worker(topics, name="torch", state_dir=state, **L2_ONLY)
    torch_worker.wait_ready()
    old = _round(kafka, topics, texts, 0, 0)
    torch_worker.stop()
    # same table, another runtime precision: the keys differ, so every answer is computed anew
    onnx_env = {**L2_ONLY, "EMOTION_STREAM_MODEL__ENGINE": "onnx-int8"}
    onnx_worker = spawn_worker(topics, name="onnx", state_dir=state, **onnx_env)
    onnx_worker.wait_ready()
    new = _round(kafka, topics, texts, 1000, len(texts))
    assert set(_levels(new)) == {"none"}
    assert {e["model"]["precision"] for e in new.values()} == {"int8"}
    assert {e["model"]["precision"] for e in old.values()} == {"fp32"}
