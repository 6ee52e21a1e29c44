"""Cost of keeping conversation state per message, and the state's size per conversation.

The workload is a synthetic partition of support chats (``--conversations``, default 2,000): each starts
at a random time within an hour and sends 4 to 40 messages about 20 s apart (exponential gaps); 70 % are
calm, 20 % turn angry, 10 % turn sad or fearful, so the default rules fire now and then. Message and
conversation ids are 36-character UUIDs. Arrival is ``sent_at`` plus 20-200 ms, except 2.5 % of
messages that arrive 5-50 s late (within the default 60 s allowance), 0.5 % that arrive 90-300 s late
(beyond it) and 0.2 % that a producer retry delivers twice. Processing time is the arrival time, so
the emission interval (60 s) acts as in production.

Variants, each over the same stream, in alternating rounds (A, B, C, A, B, C, ...), reported as the
median over the rounds of the per-message CPU time of the benchmark's thread (``time.thread_time``; total
/ messages; the garbage collector stays on). CPU time is what the worker's loop pays per message; wall
time is recorded too, but on a shared machine it mostly measures the neighbours.

* ``table``: what the worker does per message with a table of codec bytes (a dict here, the RocksDB
  table there): decode the conversation's bytes, ``apply``, encode and store them, and serialise the
  ``conversation_state.v1`` and ``escalation.v1`` records ``apply`` returned.
* ``memory``: ``apply`` on states kept as objects (a worker that caches decoded states and writes bytes
  only at commit), records built but not serialised.
* ``no-rules``: ``memory`` without rules: what the rules add is ``memory`` minus this.
* ``stage``: the worker's own path, :class:`~stream_app.conversations.stage.ConversationStage` driven as the
  emitter drives it: released slots in flushes of ``--flush`` (default 64, the worker's batch size), each
  conversation's state applied in memory, its records serialised, its state encoded once per flush (the
  changelog value) and handed to the store once "acknowledged" (a dict here, RocksDB there; neither
  RocksDB nor Kafka is measured). Processing time is the arrival of each flush's last message. This is
  the figure to hold against the worker's host path: apply + rules + records + amortised encode.

Then: ``encode``, ``decode`` and a ``conversation_state.v1`` (built and serialised) per state (CPU time,
best of 3), a ``table`` pass timed message by message in wall time (p50, p99), and why the records were
emitted (a conversation's first message, a dominant change, the emission interval).
Sizes: the encoded state of every conversation at the end (median, p90, p99, max), and a worst case
built for real: ids of 256 four-byte characters (the chat_message.v1 limit), every label in every pane,
a full rise history.

The host path to compare with: ``--host-path-us`` (default 55 µs, the batch-consumer figure the
architecture aims the worker's loop at) and, when ``benchmarks/results/host-ceiling-real.json`` exists
(``benchmarks/host_ceiling.py --engine real``), the worker's measured drain rate on this machine (median of
its rounds).

Run: ``.venv/bin/python benchmarks/conversations.py`` (about a minute on 2 cores). Prints a table and writes
``benchmarks/results/conversations.json``. ``--compare-reference`` adds ``reference-memory``: the
``memory`` variant with the straightforward implementation the tests keep as their oracle
(``tests/unit/conversations/reference.py``, the code before the performance work), for before/after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_app.conversations.rules import load_rules
from stream_app.conversations.stage import ConversationStage
from stream_app.conversations.state import ClassifiedMessage, ConversationState
from stream_app.conversations.tracker import ConversationTracker
from stream_app.core.slots import ChunkInfo, Lane, OutRecord, Result, Slot
from stream_app.devtools.stores import MemoryStateStore
from stream_app.metrics import Metrics
from stream_app.records import ChatMessage, rfc3339

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
TOPIC = "chat.messages.v1"
RESULTS = Path(__file__).resolve().parent / "results"
# Top-label frequencies of a calm chat (roughly GoEmotions' Ekman shares), and what escalation shifts.
CALM = {"neutral": 0.45, "joy": 0.25, "surprise": 0.1, "anger": 0.07, "sadness": 0.07, "disgust": 0.03, "fear": 0.03}
ANGRY = {"anger": 0.45, "disgust": 0.15, "neutral": 0.25, "sadness": 0.05, "joy": 0.05, "surprise": 0.03, "fear": 0.02}
SAD = {"sadness": 0.45, "fear": 0.25, "neutral": 0.2, "anger": 0.04, "joy": 0.03, "surprise": 0.02, "disgust": 0.01}


def _draw(rng: random.Random, dist: dict[str, float]) -> str:
    return rng.choices(list(dist), weights=list(dist.values()))[0]


def _scores(rng: random.Random, nprng: np.random.Generator, label: str) -> list[float]:
    top = rng.uniform(0.4, 0.95)
    rest = nprng.dirichlet(np.ones(len(LABELS) - 1)) * (1.0 - top)
    out = [float(x) for x in np.asarray(rest, dtype=np.float32)]
    i = LABELS.index(label)
    out.insert(i, float(np.float32(top)))
    return out


def make_stream(n_conversations: int, seed: int) -> tuple[list[ClassifiedMessage], list[float]]:
    """Messages of one partition in arrival order (offsets follow) and the processing time of each."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    t0 = 1_795_000_200.0
    arrivals: list[tuple[float, str, str, float, str]] = []  # (arrival, conversation, message id, sent_at, label)
    for _ in range(n_conversations):
        cid = str(uuid.UUID(int=rng.getrandbits(128)))
        kind = rng.choices(["calm", "angry", "sad"], weights=[0.7, 0.2, 0.1])[0]
        n = rng.randint(4, 40)
        t = t0 + rng.uniform(0, 3600)
        for i in range(n):
            t += max(1.0, rng.expovariate(1 / 20))
            turned = kind != "calm" and i >= n // 3
            label = _draw(rng, (ANGRY if kind == "angry" else SAD) if turned else CALM)
            u = rng.random()
            delay = rng.uniform(5, 50) if u < 0.025 else rng.uniform(90, 300) if u < 0.03 else rng.uniform(0.02, 0.2)
            mid = str(uuid.UUID(int=rng.getrandbits(128)))
            arrivals.append((t + delay, cid, mid, t, label))
            if rng.random() < 0.002:
                arrivals.append((t + delay + 0.5, cid, mid, t, label))
    arrivals.sort()
    msgs = [
        ClassifiedMessage(cid, mid, sent_at, LABELS.index(label), _scores(rng, nprng, label), TOPIC, 0, offset)
        for offset, (_, cid, mid, sent_at, label) in enumerate(arrivals)
    ]
    return msgs, [a[0] for a in arrivals]


def make_tracker(rules: bool) -> ConversationTracker:
    """The tracker with the defaults the lead will put in settings (and the default rules)."""
    return ConversationTracker(labels=LABELS, rules=load_rules(labels=LABELS) if rules else ())


def run_table(t: ConversationTracker, msgs: list[ClassifiedMessage], nows: list[float]) -> dict[str, float]:
    store: dict[str, bytes] = {}
    emitted = alerts = 0
    for m, now in zip(msgs, nows, strict=True):
        raw = store.get(m.conversation_id)
        u = t.apply(None if raw is None else t.decode(raw), m, now=now)
        if u.changed:
            store[m.conversation_id] = t.encode(u.state)
        if u.emit is not None:
            u.emit.to_json()
            emitted += 1
        for a in u.alerts:
            a.to_json()
            alerts += 1
    return {"emitted": emitted, "alerts": alerts, "conversations": len(store)}


def run_memory(t: ConversationTracker, msgs: list[ClassifiedMessage], nows: list[float]) -> dict[str, float]:
    states: dict[str, ConversationState] = {}
    emitted = alerts = 0
    for m, now in zip(msgs, nows, strict=True):
        u = t.apply(states.get(m.conversation_id), m, now=now)
        states[m.conversation_id] = u.state
        emitted += u.emit is not None
        alerts += len(u.alerts)
    return {"emitted": emitted, "alerts": alerts, "conversations": len(states)}


def make_slots(msgs: list[ClassifiedMessage]) -> list[Slot]:
    """The released slots the emitter would hand the stage for these messages (built before timing)."""
    lane = Lane(0)
    chunk = ChunkInfo(topic=TOPIC, received_wall=0.0, received_mono=0.0, received_at="")
    out = []
    for m in msgs:
        chat = ChatMessage.model_validate(
            {
                "message_id": m.message_id,
                "conversation_id": m.conversation_id,
                "user_id": "u",
                "text": "x",
                "sent_at": rfc3339(m.sent_at),
            }
        )
        result = Result(m.label_index, tuple(m.scores), False)
        out.append(Slot(lane, m.offset, 0, None, None, (), chunk, message=chat, result=result))
    return out


def run_stage(
    t: ConversationTracker, slots: list[Slot], nows: list[float], flush: int, metrics: Metrics
) -> dict[str, float]:
    clock = [0.0]
    store = MemoryStateStore("emotion-conversations-v1-changelog")
    stage = ConversationStage(
        t, store, states_topic="states", alerts_topic="alerts", metrics=metrics, wall_clock=lambda: clock[0]
    )
    records = changelog = 0
    for start in range(0, len(slots), flush):
        batch = slots[start : start + flush]
        clock[0] = nows[start + len(batch) - 1]
        out = stage.on_release(batch)
        records += len(out.now)
        after: list[OutRecord] = [r for _, r in out.after]
        changelog += len(after)
        if after:
            stage.on_after_acked(store.changelog_topic, 0, after, start)
    return {"records": records, "changelog": changelog, "conversations": len(store.data)}


def emission_reasons(t: ConversationTracker, msgs: list[ClassifiedMessage], nows: list[float]) -> dict[str, int]:
    """Why the records were emitted: ``first`` (a conversation's first message), ``dominant_changed``, ``interval``."""
    states: dict[str, ConversationState] = {}
    reasons = {"first": 0, "dominant_changed": 0, "interval": 0}
    for m, now in zip(msgs, nows, strict=True):
        u = t.apply(states.get(m.conversation_id), m, now=now)
        states[m.conversation_id] = u.state
        if u.emit is not None:
            first = u.emit.reason == "dominant_changed" and u.state.message_count == 1
            reasons["first" if first else u.emit.reason] += 1
    return reasons


def final_states(t: ConversationTracker, msgs: list[ClassifiedMessage], nows: list[float]) -> list[ConversationState]:
    states: dict[str, ConversationState] = {}
    for m, now in zip(msgs, nows, strict=True):
        states[m.conversation_id] = t.apply(states.get(m.conversation_id), m, now=now).state
    return list(states.values())


def worst_case_state(t: ConversationTracker) -> ConversationState:
    """A real state at the size limits: 256-character ids of 4-byte characters, every label in every pane."""
    big = "\U0001f600" * 255
    state: ConversationState | None = None
    t0 = 1_795_000_200.0
    offset = 0
    pane = t.window.pane_s
    for p in range(t.window.n_panes):
        for i, _ in enumerate(LABELS):
            sent_at = t0 + p * pane + i * pane / (len(LABELS) + 1)
            scores = [0.0] * len(LABELS)
            scores[i] = 1.0
            msg = ClassifiedMessage(big + "c", f"{big}{offset % 10}", sent_at, i, scores, TOPIC, 0, offset)
            state = t.apply(state, msg, now=sent_at + 1).state
            offset += 1
    assert state is not None
    return state


def pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def timed(fn: Callable[[], object], n: int) -> float:
    """CPU microseconds of this thread per item, for one call of ``fn`` that handles ``n`` items."""
    t0 = time.thread_time()
    fn()
    return (time.thread_time() - t0) / n * 1e6


def timed_both(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per item for one call of ``fn`` that handles ``n`` items."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.thread_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--host-path-us", type=float, default=55.0)
    p.add_argument("--flush", type=int, default=64, help="released slots per flush in the stage variant")
    p.add_argument(
        "--compare-reference",
        action="store_true",
        help="also time the memory variant with tests/unit/conversations/reference.py (before the performance work)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "conversations.json")
    args = p.parse_args(argv)

    msgs, nows = make_stream(args.conversations, args.seed)
    n = len(msgs)
    with_rules, without_rules = make_tracker(True), make_tracker(False)
    slots = make_slots(msgs)
    metrics = Metrics()
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "table": lambda: run_table(with_rules, msgs, nows),
        "memory": lambda: run_memory(with_rules, msgs, nows),
        "no-rules": lambda: run_memory(without_rules, msgs, nows),
        "stage": lambda: run_stage(with_rules, slots, nows, args.flush, metrics),
    }
    if args.compare_reference:
        from tests.unit.conversations.reference import ReferenceTracker

        reference = ReferenceTracker(labels=LABELS, rules=load_rules(labels=LABELS))
        variants["reference-memory"] = lambda: run_memory(reference, msgs, nows)  # type: ignore[arg-type]
    counts = run_table(with_rules, msgs, nows)  # warm-up, and the emission/alert counts (deterministic)
    stage_counts = run_stage(with_rules, slots, nows, args.flush, metrics)
    reasons = emission_reasons(with_rules, msgs, nows)
    gc.collect()
    gc.freeze()
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    wall_rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            cpu, wall = timed_both(fn, n)
            rounds[name].append(cpu)
            wall_rounds[name].append(wall)
    per_message = {name: statistics.median(r) for name, r in rounds.items()}
    per_message_wall = {name: statistics.median(r) for name, r in wall_rounds.items()}

    # one table pass timed message by message
    store: dict[str, bytes] = {}
    each_ns: list[float] = []
    clock = time.perf_counter_ns
    for m, now in zip(msgs, nows, strict=True):
        t0 = clock()
        raw = store.get(m.conversation_id)
        u = with_rules.apply(None if raw is None else with_rules.decode(raw), m, now=now)
        store[m.conversation_id] = with_rules.encode(u.state)
        if u.emit is not None:
            u.emit.to_json()
        for a in u.alerts:
            a.to_json()
        each_ns.append((clock() - t0) / 1000)

    states = final_states(with_rules, msgs, nows)
    blobs = [with_rules.encode(s) for s in states]
    encode_us = min(timed(lambda: [with_rules.encode(s) for s in states], len(states)) for _ in range(3))
    decode_us = min(timed(lambda: [with_rules.decode(b) for b in blobs], len(blobs)) for _ in range(3))
    record_us = min(timed(lambda: [with_rules.snapshot(s).to_json() for s in states], len(states)) for _ in range(3))
    sizes = [len(b) for b in blobs]
    worst = len(with_rules.encode(worst_case_state(with_rules)))
    late = sum(s.late_ignored for s in states)
    dup = sum(s.duplicates_ignored for s in states)

    drain = RESULTS / "host-ceiling-real.json"
    worker_us = None
    if drain.exists():
        rate = json.loads(drain.read_text()).get("summary", {}).get("worker", {}).get("msgs_per_s", {}).get("median")
        worker_us = 1e6 / rate if rate else None

    print(
        f"conversation state per message: {n:,} messages over {len(states):,} conversations, "
        f"median of {args.rounds} alternating rounds (µs; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs)"
    )
    header = f"{'variant':<18}{'CPU':>8}{'wall':>8}   CPU per round"
    print(header)
    print("-" * 72)
    for name, r in rounds.items():
        print(f"{name:<18}{per_message[name]:>8.1f}{per_message_wall[name]:>8.1f}   {', '.join(f'{x:.1f}' for x in r)}")
    print(f"rules add {per_message['memory'] - per_message['no-rules']:.1f} µs/message (memory - no-rules)")
    print(
        f"stage (the worker's path, flushes of {args.flush}): {per_message['stage']:.1f} µs/message; "
        f"{stage_counts['changelog'] / n:.2f} state writes (encodes) per message"
    )
    q = pcts(each_ns)
    print(f"table, message by message (wall): p50 {q['median']:.1f}  p99 {q['p99']:.1f}  max {q['max']:.0f} µs")
    print(
        f"codec per state: encode {encode_us:.1f} µs, decode {decode_us:.1f} µs; "
        f"conversation_state.v1 built + serialised {record_us:.1f} µs"
    )
    print(
        f"per message: {counts['emitted'] / n:.3f} conversation_state.v1 and {counts['alerts'] / n:.4f} escalation.v1 "
        f"records; {late} late messages and {dup} duplicates ignored"
    )
    print(
        "conversation_state.v1 per message by reason: "
        + ", ".join(f"{k} {v / n:.3f}" for k, v in reasons.items())
        + " (the interval, emit_interval_s, dominates)"
    )
    s = pcts([float(x) for x in sizes])
    print(
        f"state bytes per conversation: median {s['median']:.0f}  p90 {s['p90']:.0f}  p99 {s['p99']:.0f}  "
        f"max {s['max']:.0f}; worst case (256 x 4-byte-character ids) {worst:,}"
    )
    share = per_message["table"] / args.host_path_us
    print(f"table / host path target {args.host_path_us:g} µs: {share:.0%}")
    if worker_us is not None:
        print(
            f"table / worker's drain time per message on this machine ({worker_us:.0f} µs, host-ceiling-real.json): "
            f"{per_message['table'] / worker_us:.1%}"
        )

    result = {
        "benchmark": "conversations",
        "created_unix": time.time(),
        "messages": n,
        "conversations": len(states),
        "rounds": args.rounds,
        "per_message_us": per_message,
        "per_message_us_rounds": rounds,
        "per_message_wall_us": per_message_wall,
        "per_message_wall_us_rounds": wall_rounds,
        "time": "per_message_us*: CPU time of the benchmark thread (time.thread_time); *_wall_*: perf_counter",
        "rules_us": per_message["memory"] - per_message["no-rules"],
        "table_each_us": pcts(each_ns),
        "encode_us": encode_us,
        "decode_us": decode_us,
        "state_record_us": record_us,
        "emitted_per_message": counts["emitted"] / n,
        "emitted_per_message_by_reason": {k: v / n for k, v in reasons.items()},
        "stage_flush": args.flush,
        "stage_state_writes_per_message": stage_counts["changelog"] / n,
        "alerts_per_message": counts["alerts"] / n,
        "late_ignored": late,
        "duplicates_ignored": dup,
        "state_bytes": s,
        "state_bytes_worst_case": worst,
        "host_path_us": args.host_path_us,
        "table_share_of_host_path": share,
        "worker_drain_us_per_message": worker_us,
        "table_share_of_worker_drain": None if worker_us is None else per_message["table"] / worker_us,
        "config": {
            "rules": [r.name for r in load_rules(labels=LABELS)],
            "window_s": with_rules.window.window_s,
            "window_pane_s": with_rules.window.pane_s,
            "allowed_lateness_s": with_rules.allowed_lateness_s,
            "mood_half_life_s": with_rules.mood_half_life_s,
            "recent_messages": with_rules.recent_messages,
            "emit_interval_s": with_rules.emit_interval_s,
            "seed": args.seed,
        },
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "command": "python benchmarks/conversations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
