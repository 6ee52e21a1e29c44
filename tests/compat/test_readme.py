"""The README's "Running against your cluster", followed as written, on a cluster of its own.

```
export EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS=broker1:9092,broker2:9092
.venv/bin/emotion-stream topics --partitions 8
.venv/bin/emotion-stream worker
```

Issue 10, item 2: these steps crash-looped (the cache changelog got 4 partitions, the input 8). The broker
here is a fresh one, so the default topic names and consumer group are this test's alone. Two variables
are added to the user's environment because this machine is shared: a free metrics port (9108 may be
taken) and a state folder under the test's temporary folder (the default one in the cache is shared by
every worktree). Every other setting is the default; the model is the one the set-up script built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka, free_port, local_kafka
from stream_app.topics import partition_counts
from tests.compat.conftest import REPO_ROOT, ClosingTable, SupervisedWorker
from tests.compat.helpers import (
    Coord,
    Msg,
    OutputWatcher,
    account,
    chat,
    malformed,
    missing_report,
    produce_confluent,
    watermarks,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT_TOPICS = ["chat.messages.v1", "emotion.events.v1", "emotion.metrics.v1", "chat.messages.dlq.v1"]
CHANGELOG = "emotion-stream-emotion-cache-v1-changelog"  # the default app id's cache table
WAIT_S = 120.0


@pytest.fixture
def own_cluster(cache_dir: Path, tmp_path: Path) -> Iterator[LocalKafka]:
    with local_kafka(cache_dir, tmp_path / "kafka") as broker:
        yield broker


def _cli() -> list[str]:
    script = Path(REPO_ROOT) / ".venv" / "bin" / "emotion-stream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stream_app.cli"]


def test_the_readme_cluster_steps_as_written(
    own_cluster: LocalKafka, closing_table: ClosingTable, data_dir: Path, tmp_path: Path
) -> None:
    bootstrap = own_cluster.bootstrap_servers
    user_env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_STREAM_")}
    env = {
        **user_env,
        "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,  # export ...BOOTSTRAP_SERVERS=...
        # the shared machine's two additions (see the module docstring); PYTHONPATH: this worktree's code
        "EMOTION_STREAM_METRICS__PORT": str(free_port()),
        "EMOTION_STREAM_WORKER__STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": REPO_ROOT,
    }
    topics = subprocess.run([*_cli(), "topics", "--partitions", "8"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert topics.returncode == 0, topics.stderr
    assert topics.stdout.strip().endswith("topics ready"), topics.stdout
    assert partition_counts(bootstrap, DEFAULT_TOPICS) == dict.fromkeys(DEFAULT_TOPICS, 8)

    worker = SupervisedWorker(env=env, log_path=tmp_path / "worker.log",
                              metrics_port=int(env["EMOTION_STREAM_METRICS__PORT"]),
                              command=(*_cli(), "worker")).start()  # fmt: skip
    try:
        texts = dev_texts(data_dir, 40)
        with OutputWatcher(bootstrap, "emotion.events.v1", "chat.messages.dlq.v1") as watcher:
            worker.wait_ready()
            placed: dict[Coord, Msg] = {}
            for round_ in range(3):  # the same texts again: repeats go through both cache levels
                msgs = [chat(f"readme-{round_}-{p}-{i}", texts[(p + i) % len(texts)], conversation=f"c-{p}",
                             partition=p) for p in range(8) for i in range(3)]  # fmt: skip
                msgs.append(malformed(f"readme-bad-{round_}", partition=round_))
                placed |= produce_confluent(bootstrap, "chat.messages.v1", msgs)
                assert watcher.wait_for(placed, WAIT_S) >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
            row = closing_table.add(account("README cluster steps (topics --partitions 8, then worker defaults)",
                                            placed, watcher, worker.restarts))  # fmt: skip
        changelog = partition_counts(bootstrap, [CHANGELOG])
        written = {p for p, (low, high) in watermarks(bootstrap, CHANGELOG, 8).items() if high > low}
        assert row.ok, (row, worker.exit_codes, worker.log_tail())
        assert changelog == {CHANGELOG: 8}
        assert written & {4, 5, 6, 7}, written
        assert worker.alive, worker.log_tail()
    finally:
        worker.stop(timeout_s=30)
        worker.kill_all()
