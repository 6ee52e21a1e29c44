"""Partition counts the worker did not choose: an input made by another tool, and a live increase.

Issue 10, item 2: with an input of 8 partitions the cache changelog got 4 and the first repeated text
crashed the worker at every start; adding partitions to a live input left them unconsumed for minutes and
then killed the worker. Here confluent-kafka's AdminClient makes and grows the input; the worker runs with
its defaults (the partition count is never given to it) and must consume every partition, co-partition its
cache changelog with the input, and never exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka, kafka_env, without_kafka_connection
from stream_app.topics import partition_counts
from tests.compat.conftest import REPO_ROOT, ClosingTable, CompatTopics, Spawn, create_topics
from tests.compat.helpers import (
    Coord,
    Msg,
    OutputWatcher,
    account,
    chat,
    confluent_admin,
    malformed,
    missing_report,
    produce_aiokafka,
    produce_confluent,
    watermarks,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 120.0
PROMPT_S = 30.0
"""Most seconds from a record's ack on a new partition to its output (metadata refresh set to 2 s)."""


def _repeats(prefix: str, texts: list[str], partitions: range, per_partition: int) -> list[Msg]:
    """Per partition, a few texts each sent several times (repeats reach the L2 cache and its changelog)."""
    msgs = []
    for p in partitions:
        for i in range(per_partition):
            text = texts[(p * 3 + i % 3) % len(texts)]
            msgs.append(chat(f"{prefix}-p{p}-{i}", text, conversation=f"{prefix}-c{p}", partition=p))
    return msgs


def _changelog(group: str) -> str:
    return f"{group}-emotion-cache-v1-changelog"


def _conversation_state(port: int, conversation: str, timeout_s: float) -> dict[str, object]:
    """``GET /conversations/{id}`` until it answers 200 (its body) or the timeout (the last body)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/conversations/{conversation}", timeout=5) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            last = dict(json.loads(exc.read()))
        time.sleep(1.0)
    return last


def _topics_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_app.cli", "topics", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip


def test_an_input_topic_made_by_another_tool_with_8_partitions(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, data_dir: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("foreign8")
    admin = confluent_admin(settings)
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # re-exported from cimpl

    admin.create_topics([NewTopic(topics.input, 8, 1)])[topics.input].result(60)
    # `emotion-stream topics` with its defaults: creates the three missing topics, reports the input as is
    env = {**without_kafka_connection(os.environ), **kafka_env(settings), **topics.env(), "PYTHONPATH": REPO_ROOT}
    env.pop("EMOTION_STREAM_TOPICS__PARTITIONS", None)
    done = _topics_cli(env)
    assert done.returncode == 0, done.stderr
    assert f"exists  {topics.input} (8 partitions" in done.stdout, done.stdout
    counts = partition_counts(settings, topics.names)
    assert counts[topics.input] == 8 and None not in counts.values(), counts

    group = f"compat-foreign8-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    worker = spawn(settings, topics, group_id=group, defaults=True)
    texts = dev_texts(data_dir, 40)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        placed: dict[Coord, Msg] = {}
        for round_ in range(3):  # repeats in separate chunks: the second sighting is admitted to L2
            placed |= produce_confluent(settings, topics.input, _repeats(f"r{round_}", texts, range(8), 3))
            placed |= produce_aiokafka(settings, topics.input, [malformed(f"f8-bad-{round_}-{p}", partition=p)
                                                               for p in range(0, 8, 3)])  # fmt: skip
            assert watcher.wait_for(placed, WAIT_S) >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
        row = closing_table.add(account("input made by confluent-kafka with 8 partitions, worker defaults",
                                        placed, watcher, worker.restarts))  # fmt: skip
        changelog_counts = partition_counts(settings, [_changelog(group)])
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert {c[1] for c in placed} == set(range(8))
    assert changelog_counts == {_changelog(group): 8}
    # the cache wrote to the changelog partitions beyond the default 4 (where 8 vs 4 used to crash)
    written = {p for p, (low, high) in watermarks(settings, _changelog(group), 8).items() if high > low}
    assert written & {4, 5, 6, 7}, written
    assert worker.alive, worker.log_tail()


def test_a_live_partition_increase_from_4_to_6(
    kafka: LocalKafka, spawn: Spawn, closing_table: ClosingTable, data_dir: Path
) -> None:
    settings = kafka.client_settings()
    topics = CompatTopics.fresh("grow")
    create_topics(settings, topics, 4)
    group = f"compat-grow-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    worker = spawn(settings, topics, group_id=group, EMOTION_STREAM_KAFKA__METADATA_MAX_AGE_S="2")
    texts = dev_texts(data_dir, 60)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        before = produce_confluent(settings, topics.input, _repeats("before", texts, range(4), 4))
        assert watcher.wait_for(before, WAIT_S) >= 0, f"{missing_report(before, watcher)}\n{worker.log_tail()}"

        from confluent_kafka.admin import NewPartitions  # type: ignore[attr-defined]  # re-exported from cimpl

        admin = confluent_admin(settings)  # held until the future resolves (a dropped handle cancels it)
        admin.create_partitions([NewPartitions(topics.input, 6)])[topics.input].result(60)
        grown_at = time.monotonic()
        new = produce_confluent(settings, topics.input, _repeats("new", texts, range(4, 6), 6))
        new |= produce_aiokafka(settings, topics.input, [malformed("grow-bad-4", partition=4)])
        old = produce_confluent(settings, topics.input, _repeats("old", texts, range(4), 2))
        new_waited = watcher.wait_for(new, PROMPT_S)
        new_latency = time.monotonic() - grown_at
        # keep it running and busy for a while on all six partitions, repeats included
        during: dict[Coord, Msg] = {**old}
        for round_ in range(4):
            during |= produce_confluent(settings, topics.input, _repeats(f"after{round_}", texts, range(6), 2))
            time.sleep(4.0)
        after_waited = watcher.wait_for({**during, **new}, WAIT_S)
        everything = {**before, **new, **during}
        row = closing_table.add(account(
            f"live partition increase 4 -> 6 (new partitions served {new_latency:.0f} s after the change)",
            everything, watcher, worker.restarts,
        ))  # fmt: skip
        changes = worker.metric("emotion_partitions_changes")
        states = f"{group}-emotion-conversations-v1-changelog"
        changelog_counts = partition_counts(settings, [_changelog(group), states])
        # conversation state is kept for the new partitions too, once the consumer has rejoined with the
        # grown state changelog (a metadata refresh, 2 s here)
        new_conversation = _conversation_state(worker.metrics_port, "after3-c5", WAIT_S)
    assert new_waited >= 0, f"new partitions not served within {PROMPT_S:.0f} s: {missing_report(new, watcher)}\n" \
                            f"{worker.log_tail()}"  # fmt: skip
    assert after_waited >= 0, f"{missing_report(everything, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert {c[1] for c in new} == {4, 5}
    assert changes >= 1
    assert changelog_counts == {_changelog(group): 6, states: 6}
    assert new_conversation.get("message_count", 0) >= 1, new_conversation
    assert worker.alive, worker.log_tail()
