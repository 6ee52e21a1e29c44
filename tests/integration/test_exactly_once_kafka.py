"""Exactly-once output over the real broker, read by read_committed consumers: every input's outcome
(event or dead letter) exactly once through SIGKILLs and restarts, a zombie fenced by its successor, and
a broker restart mid-stream."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from stream_app.devtools.clients import chat_message
from stream_app.devtools.kafka_local import LocalKafka, local_kafka
from tests.integration.conftest import Topics, make_topics
from tests.integration.helpers import dev_texts, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EOS = {
    "EMOTION_STREAM_WORKER__DELIVERY": "exactly_once",
    "EMOTION_STREAM_CACHE__L1_ENABLED": "false",
    "EMOTION_STREAM_CACHE__L2_ENABLED": "false",
}
EOS_CACHED = {"EMOTION_STREAM_WORKER__DELIVERY": "exactly_once"}


def _records(data_dir: Path, n: int) -> list[tuple[bytes | None, bytes | None]]:
    texts = dev_texts(data_dir, n)
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, text in enumerate(texts):
        if i % 50 == 7:
            records.append((f"c-{i % 29}".encode(), b"{not json"))  # a dead letter, also exactly once
        else:
            records.append(chat_message(f"m-{i}", f"c-{i % 29}", text))
    return records


def _outcomes(bootstrap: str, topics: Topics, expected: int, timeout_s: float) -> Counter[tuple[int, int]]:
    """Source coordinates of every committed event and dead letter (read_committed), until ``expected``
    distinct ones arrived and nothing more came for 5 s, or the timeout."""

    async def run() -> Counter[tuple[int, int]]:
        consumer = AIOKafkaConsumer(
            topics.events,
            topics.dead_letters,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        seen: Counter[tuple[int, int]] = Counter()
        try:
            deadline = time.monotonic() + timeout_s
            quiet_since: float | None = None
            while time.monotonic() < deadline:
                got = await consumer.getmany(timeout_ms=500)
                import orjson

                for records in got.values():
                    for r in records:
                        source = orjson.loads(r.value)["source"]
                        seen[(source["partition"], source["offset"])] += 1
                if got:
                    quiet_since = None
                elif len(seen) >= expected:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 5:
                        break
            return seen
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _input_coordinates(bootstrap: str, topics: Topics) -> set[tuple[int, int]]:
    async def run() -> set[tuple[int, int]]:
        consumer = AIOKafkaConsumer(topics.input, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest")  # fmt: skip
        await consumer.start()
        out: set[tuple[int, int]] = set()
        try:
            while True:
                got = await consumer.getmany(timeout_ms=2000)
                if not got:
                    return out
                for tp, records in got.items():
                    out.update((tp.partition, r.offset) for r in records)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _notable(log: Path, limit: int = 120) -> str:
    """The log's warnings, errors and partition movements (the last ``limit`` lines): what explains a loss."""
    marks = ("WARNING", "ERROR", "CRITICAL", "assigned partitions", "Revoking", "skipped", "reset")
    lines = [line[:400] for line in log.read_text(errors="replace").splitlines() if any(m in line for m in marks)]
    return "\n".join(lines[-limit:])


def _assert_exactly_once(bootstrap: str, topics: Topics, timeout_s: float = 300, workers: Iterable[Any] = ()) -> None:
    inputs = _input_coordinates(bootstrap, topics)
    seen = _outcomes(bootstrap, topics, len(inputs), timeout_s)
    missing = inputs - set(seen)
    duplicated = {k: v for k, v in seen.items() if v > 1}
    extra = set(seen) - inputs
    if missing:
        per_partition = Counter(p for p, _ in missing)
        logs = "\n".join(f"--- {w.log_path.name}:\n{_notable(w.log_path)}" for w in workers)
        raise AssertionError(
            f"{len(missing)} inputs without an outcome (per partition {dict(per_partition)}), "
            f"e.g. {sorted(missing)[:5]}\n{logs}"
        )
    assert not duplicated, f"{len(duplicated)} inputs with more than one outcome, e.g. {list(duplicated.items())[:5]}"
    assert not extra


def test_three_sigkills_and_restarts_leave_every_outcome_exactly_once(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    topics = make_topics(kafka, partitions=4)
    records = _records(data_dir, 1500)
    rng = random.Random(11)
    state = Path(os.environ.get("TMPDIR", "/tmp")) / f"eos-state-{rng.random()}"
    worker = spawn_worker(topics, name="w0", state_dir=state, **EOS)
    worker.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, records)
    for n in range(3):
        time.sleep(rng.uniform(1.0, 4.0))
        worker.kill()
        worker = spawn_worker(topics, name=f"w{n + 1}", state_dir=state, **EOS)
        worker.wait_ready()
    _assert_exactly_once(kafka.bootstrap_servers, topics)


def test_two_workers_under_paced_input_and_sigkills_keep_every_outcome_exactly_once(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    """The production shape: two workers with their caches on, input arriving while one of them is killed
    and restarted, so the survivor is rebalanced each time with transactions in flight and partitions
    are re-assigned while messages keep coming (found by a new user: offsets fetched before Faust's seek
    were delivered again and committed twice; a revocation closed a producer under a transaction of stage
    records and crashed the survivor)."""
    topics = make_topics(kafka, partitions=4)
    records = _records(data_dir, 1500)
    rng = random.Random(7)
    workers = {name: spawn_worker(topics, name=name, **EOS_CACHED) for name in ("a", "b")}
    for w in workers.values():
        w.wait_ready()

    def paced() -> None:  # about 125 messages a second, for 12 s
        for i in range(0, len(records), 50):
            produce(kafka.bootstrap_servers, topics.input, records[i : i + 50])
            time.sleep(0.4)

    producing = threading.Thread(target=paced)
    producing.start()
    killed = []
    for n in range(3):
        time.sleep(rng.uniform(2.0, 5.0))
        name = rng.choice(sorted(workers))
        workers[name].kill()
        killed.append(workers[name])
        workers[name] = spawn_worker(topics, name=f"{name}{n}", **EOS_CACHED)
    producing.join(120)
    for w in workers.values():
        w.wait_ready()
    _assert_exactly_once(kafka.bootstrap_servers, topics)
    crashed = [w for w in workers.values() if w.process is not None and w.process.poll() is not None]
    assert not crashed, "a worker that was not killed stopped:\n" + "\n".join(w.log_tail() for w in crashed)


def test_a_paused_zombie_is_fenced_by_the_worker_that_took_its_partitions(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    topics = make_topics(kafka, partitions=4)
    zombie = spawn_worker(topics, name="zombie", **EOS)
    zombie.wait_ready()
    other = spawn_worker(topics, name="other", **EOS)
    other.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, _records(data_dir, 1200))
    time.sleep(2.0)
    assert zombie.process is not None
    os.killpg(zombie.process.pid, signal.SIGSTOP)  # a long GC pause, a frozen VM: the group moves on
    try:
        time.sleep(12)  # past the session timeout: "other" gets every partition and fences the zombie
    finally:
        os.killpg(zombie.process.pid, signal.SIGCONT)
    _assert_exactly_once(kafka.bootstrap_servers, topics, workers=[zombie, other])
    # the zombie noticed it was fenced (or its partitions were gone) and never committed anything after
    time.sleep(2)
    del other


def _wait_log(worker: Any, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.log_path.read_text(errors="replace"):
        assert worker.process.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{worker.log_tail()}"
        time.sleep(0.2)


def test_a_rebalance_while_a_worker_is_still_loading_takes_each_backlog_input_once(
    kafka: Any, spawn_worker: Any, data_dir: Path, tmp_path: Path
) -> None:
    """A new group on a backlog: the first worker is assigned every partition and fetches a chunk while its
    model is still loading (here: warming its cache from a phrase file), then a second worker joins. The
    first keeps some partitions; when it becomes ready, the chunk it fetched before the rebalance and the
    same records read again after Faust's seek must not both be taken (found by a new user: each record of
    the kept partitions committed twice, under exactly-once and at-least-once alike)."""
    topics = make_topics(kafka, partitions=4)
    produce(kafka.bootstrap_servers, topics.input, _records(data_dir, 800))
    train = (data_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    warm = tmp_path / "warm.txt"  # inferred before the pipeline is ready: a start-up of several seconds
    warm.write_text("\n".join(line.split("\t", 1)[0] for line in train[:WARM_PHRASES]))
    slow = spawn_worker(topics, name="slow", EMOTION_STREAM_CACHE__WARM_FILE=str(warm),
                        **{**EOS_CACHED, "EMOTION_STREAM_CACHE__L2_ENABLED": "false"})  # fmt: skip
    _wait_log(slow, "Setting newly assigned partitions")
    time.sleep(1.0)  # its first fetch returns meanwhile, and waits for the pipeline
    assert "pipeline ready" not in slow.log_path.read_text(errors="replace"), "started too fast to show it"
    other = spawn_worker(topics, name="other", **EOS)
    other.wait_ready()
    slow.wait_ready()
    _wait_log(slow, "pipeline ready")
    text = slow.log_path.read_text(errors="replace")
    before_ready = text[: text.index("pipeline ready")]
    assert before_ready.count("Setting newly assigned partitions") >= 2, "no rebalance while it was loading"
    _assert_exactly_once(kafka.bootstrap_servers, topics, workers=[slow, other])


WARM_PHRASES = 6000


@pytest.fixture
def own_kafka(cache_dir: Path, tmp_path: Path) -> Iterator[LocalKafka]:
    with local_kafka(cache_dir, tmp_path / "kafka-restart") as broker:
        yield broker


def test_a_broker_restart_mid_stream_leaves_every_outcome_exactly_once(
    own_kafka: LocalKafka, spawn_worker: Any, data_dir: Path, tmp_path: Path
) -> None:
    topics = make_topics(own_kafka, partitions=2)
    env = {**EOS, "EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS": own_kafka.bootstrap_servers}
    state = tmp_path / "state-restart"
    worker = spawn_worker(topics, name="r0", state_dir=state, **env)
    worker.wait_ready()
    produce(own_kafka.bootstrap_servers, topics.input, _records(data_dir, 1000))
    time.sleep(3)
    own_kafka.stop()
    time.sleep(3)
    own_kafka.start()
    # the worker either rode it out or stopped (a failed transaction is fatal): restart it when it did
    deadline = time.monotonic() + 60
    n = 0
    while time.monotonic() < deadline:
        assert worker.process is not None
        if worker.process.poll() is not None:
            n += 1
            worker = spawn_worker(topics, name=f"r{n}", state_dir=state, **env)
            worker.wait_ready()
            break
        time.sleep(1)
    _assert_exactly_once(own_kafka.bootstrap_servers, topics)


def _readyz(port: int, timeout_s: float) -> tuple[int, str]:
    """Poll ``/readyz`` until 200 or the timeout; the last (status, body)."""
    deadline = time.monotonic() + timeout_s
    last = (0, "")
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            last = (int(exc.code), exc.read().decode())
        except OSError as exc:
            last = (0, repr(exc))
        time.sleep(0.5)
    return last


def test_switching_back_to_at_least_once_recovers_the_tables_written_in_transactions(
    kafka: Any, spawn_worker: Any, data_dir: Path
) -> None:
    """Changelogs written under exactly-once end in transaction markers; a worker of the same group started
    at-least-once must still finish their recovery (it waited for ever for a record at the marker)."""
    topics = make_topics(kafka, partitions=2)
    records = _records(data_dir, 300)
    eos = spawn_worker(topics, name="eos", **EOS_CACHED)
    eos.wait_ready()
    produce(kafka.bootstrap_servers, topics.input, records[:200])
    assert len(_outcomes(kafka.bootstrap_servers, topics, 200, timeout_s=120)) == 200
    eos.stop()
    alo = spawn_worker(topics, name="alo")
    alo.wait_ready()
    status, body = _readyz(alo.metrics_port, 60)
    assert status == 200, f"{body}\n{alo.log_tail()}"
    produce(kafka.bootstrap_servers, topics.input, records[200:])
    assert len(_outcomes(kafka.bootstrap_servers, topics, 300, timeout_s=120)) == 300
