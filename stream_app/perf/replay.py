"""Replay a chat corpus through a running worker over Kafka and account for every message.

This is the chat service's side and a downstream consumer's side at once: it produces
``chat_message.v1`` records (at a fixed rate, or as fast as the client goes) while a consumer reads
``emotion.events.v1``, ``chat.messages.dlq.v1`` and ``emotion.metrics.v1``. Every message must end in
an event or a dead letter; :class:`ReplayAccounting` (plain, no broker) decides which did and what
went wrong, and :func:`run_replay` is the thin async shell around it.

Accounting rules (what the report's numbers mean):

* an event belongs to the run when its ``message_id`` is one of the corpus ids (ids carry a run
  prefix, so events of other runs on the same topic are counted as ``foreign_events`` and ignored);
* a dead letter belongs to the run when its ``source`` (topic, partition, offset) is the coordinate
  the broker acknowledged for one of our sends; a dead letter seen before that acknowledgement is
  parked and matched when the acknowledgement arrives;
* a *duplicate* is a second event for a message id (``duplicate_events``); a duplicate that also
  repeats an ``event_id`` is a redelivery (``duplicate_event_ids``), which at-least-once allows;
* *missing* = no event and no dead letter; *unexpected* dead letters are well-formed inputs that were
  dead-lettered; ``reason_mismatches`` are malformed inputs dead-lettered for another reason than the
  one the corpus planted;
* end-to-end latency is from just before the produce call to the consumer's receipt, both read from
  the same machine's wall clock; throughput counts first events per second over the run (first send
  to last event) and at steady state (between the 10th and the 90th percentile of arrival times);
* consumer lag is the sum over input partitions of end offset minus the watched group's committed
  offset (the run's start offset where the group has not committed yet), sampled once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import orjson

from stream_app.cache.keys import normalise
from stream_app.devtools.clients import chat_message, open_producer
from stream_app.errors import DataError
from stream_app.kafka_config import KafkaTarget, aiokafka_client_kwargs, as_kafka_settings
from stream_app.records import parse_rfc3339

__all__ = [
    "MALFORMED_KINDS",
    "Corpus",
    "CorpusMessage",
    "MessageKind",
    "ReplayAccounting",
    "ReplayReport",
    "ReplayTopics",
    "build_corpus",
    "load_texts",
    "percentiles",
    "read_report",
    "run_replay",
    "write_report",
    "zipf_weights",
]

MessageKind = Literal["unique", "repeat", "bad_json", "bad_utf8", "schema", "empty_text"]
MALFORMED_KINDS: tuple[MessageKind, ...] = ("bad_json", "bad_utf8", "schema", "empty_text")
_EXPECTED_REASON: dict[str, str] = {
    "bad_json": "undecodable",
    "bad_utf8": "undecodable",
    "schema": "schema",
    "empty_text": "empty_text",
}
STAGE_FIELDS = ("queue_wait", "tokenize", "infer", "postprocess", "produce")
TIMING_FIELDS = ("decode", "cache", "queue_wait", "tokenize", "infer", "postprocess", "total")


# ---------------------------------------------------------------------------------------------- corpus
def load_texts(source: str | Path, data_dir: Path) -> list[str]:
    """Texts to replay: ``dev``/``train`` (the GoEmotions split in ``data_dir``), a ``.jsonl`` file
    (field ``text``) or a TSV file (first column). Empty texts are skipped.

    Raises:
        DataError: the file is missing, or a JSONL line is not an object with a string ``text``.
    """
    path = data_dir / f"{source}.tsv" if str(source) in ("dev", "train") else Path(source)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON: {exc}") from exc
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise DataError(f"{path}:{n}: expected an object with a string field 'text'")
            texts.append(doc["text"])
    else:
        texts = [line.split("\t", 1)[0] for line in lines]
    return [t for t in texts if t.strip()]


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    """Probabilities of ranks 1..n under a Zipf law with exponent ``s`` (normalised to sum to 1)."""
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    """One message of a replay, in send order."""

    index: int
    message_id: str
    conversation_id: str
    user_id: str
    kind: MessageKind
    text: str | None = None
    raw_value: bytes | None = None  # the planted bytes of a malformed message

    @property
    def malformed(self) -> bool:
        return self.kind in MALFORMED_KINDS

    @property
    def expected_reason(self) -> str | None:
        """The dead-letter reason the worker should give (None: an event is expected)."""
        return _EXPECTED_REASON.get(self.kind)

    @property
    def key(self) -> bytes:
        return self.conversation_id.encode()

    def record(self) -> tuple[bytes, bytes]:
        """The Kafka (key, value); a well-formed message is stamped with ``sent_at`` = now."""
        if self.raw_value is not None:
            return self.key, self.raw_value
        assert self.text is not None
        return chat_message(self.message_id, self.conversation_id, self.text, user_id=self.user_id)


@dataclass(frozen=True)
class Corpus:
    """The messages of one replay and how they were made."""

    messages: tuple[CorpusMessage, ...]
    popular_pool: tuple[str, ...]
    seed: int
    id_prefix: str
    varied_unique: int = 0  # unique texts made distinct with a suffix because the source ran out

    def __len__(self) -> int:
        return len(self.messages)

    def kinds(self) -> dict[str, int]:
        return dict(Counter(m.kind for m in self.messages))

    def expected_dead_letters(self) -> dict[str, int]:
        return dict(Counter(m.expected_reason for m in self.messages if m.expected_reason is not None))

    def describe(self) -> dict[str, Any]:
        return {
            "messages": len(self.messages),
            "kinds": self.kinds(),
            "expected_dead_letters": self.expected_dead_letters(),
            "conversations": len({m.conversation_id for m in self.messages}),
            "popular_pool": len(self.popular_pool),
            "varied_unique": self.varied_unique,
            "seed": self.seed,
            "id_prefix": self.id_prefix,
        }


def _malformed_value(kind: MessageKind, variant: int, message_id: str, conversation_id: str) -> bytes:
    good: dict[str, object] = {
        "message_id": message_id,
        "conversation_id": conversation_id,
        "user_id": "user-bad",
        "sent_at": "2026-01-01T00:00:00Z",
    }
    if kind == "bad_json":
        return f'{{"message_id": "{message_id}", "text": "cut off'.encode()
    if kind == "bad_utf8":
        return f'{{"message_id": "{message_id}", "text": "'.encode() + b"\xff\xfe\xfa" + b'"}'
    if kind == "empty_text":
        return orjson.dumps({**good, "text": "  \n\t "})
    # schema violations of several shapes, so the decode path's branches all see traffic
    shapes: list[object] = [
        {k: v for k, v in good.items() if k != "user_id"} | {"text": "no user id here"},
        {**good, "text": 42},
        {**good, "text": "bad time", "sent_at": "yesterday"},
        [message_id, "not an object"],
        {**good, "text": ""},
    ]
    return orjson.dumps(shapes[variant % len(shapes)])


def build_corpus(
    texts: Sequence[str],
    n: int,
    repeat_share: float = 0.0,
    malformed_share: float = 0.0,
    conversations: int = 1000,
    seed: int = 0,
    *,
    pool_size: int = 100,
    zipf_s: float = 1.1,
    id_prefix: str | None = None,
) -> Corpus:
    """A replay corpus of ``n`` messages.

    ``round(n * repeat_share)`` messages repeat texts drawn Zipf-distributed (exponent ``zipf_s``) from a
    pool of ``pool_size`` popular texts; ``round(n * malformed_share)`` are malformed (bad JSON, invalid
    UTF-8, schema violations, empty text, in turn); the rest carry texts that are unique after
    normalisation and distinct from the pool (made distinct with a ``#k`` suffix if the source runs out).
    Kinds are shuffled; message ids (``<prefix>-<index>``) are unique; conversation ids are dealt round-robin
    over ``conversations`` ids, so every conversation gets traffic once ``n >= conversations``.

    Raises:
        ValueError: shares outside [0, 1] or summing over 1, no usable text, or non-positive sizes.
    """
    if n < 0 or conversations < 1 or pool_size < 1:
        raise ValueError("need n >= 0, conversations >= 1 and pool_size >= 1")
    if not (0 <= repeat_share <= 1 and 0 <= malformed_share <= 1) or repeat_share + malformed_share > 1 + 1e-9:
        raise ValueError("repeat_share and malformed_share must be in [0, 1] and sum to at most 1")
    rng = random.Random(seed)
    prefix = id_prefix or f"r{uuid.uuid4().hex[:8]}"
    distinct: dict[str, str] = {}
    for text in texts:
        key = normalise(text)
        if key and key not in distinct:
            distinct[key] = text
    if not distinct and n:
        raise ValueError("no non-empty texts to build a corpus from")
    n_bad = round(n * malformed_share)
    n_rep = min(round(n * repeat_share), n - n_bad)
    n_uni = n - n_bad - n_rep

    originals = list(distinct.values())
    rng.shuffle(originals)
    pool: list[str] = []
    if n_rep:
        # keep at least half of the texts for the unique messages
        size = max(1, min(pool_size, len(originals) // 2 if len(originals) > 1 else 1))
        pool, originals = originals[:size], originals[size:] or originals[:size]
    unique_texts: list[str] = []
    varied = 0
    cycle = 0
    while len(unique_texts) < n_uni:
        for text in originals[: n_uni - len(unique_texts)]:
            if cycle:
                unique_texts.append(f"{text} #{cycle}")
                varied += 1
            else:
                unique_texts.append(text)
        cycle += 1
    repeats = rng.choices(pool, weights=zipf_weights(len(pool), zipf_s), k=n_rep) if n_rep else []

    unique_kind: list[MessageKind] = ["unique"]
    repeat_kind: list[MessageKind] = ["repeat"]
    kinds = unique_kind * n_uni + repeat_kind * n_rep
    kinds += [MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i in range(n_bad)]
    rng.shuffle(kinds)
    uni_it, rep_it = iter(unique_texts), iter(repeats)
    bad_variant: Counter[str] = Counter()
    users = max(2, conversations * 3 // 2)
    messages: list[CorpusMessage] = []
    for i, kind in enumerate(kinds):
        message_id = f"{prefix}-{i:07d}"
        conversation_id = f"conv-{i % conversations:05d}"
        user_id = f"user-{rng.randrange(users)}"
        if kind == "unique":
            messages.append(CorpusMessage(i, message_id, conversation_id, user_id, kind, text=next(uni_it)))
        elif kind == "repeat":
            messages.append(CorpusMessage(i, message_id, conversation_id, user_id, kind, text=next(rep_it)))
        else:
            raw = _malformed_value(kind, bad_variant[kind], message_id, conversation_id)
            bad_variant[kind] += 1
            messages.append(CorpusMessage(i, message_id, conversation_id, user_id, kind, raw_value=raw))
    return Corpus(tuple(messages), tuple(pool), seed, prefix, varied)


# ------------------------------------------------------------------------------------------- accounting
def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": .., "p95": .., "p99": .., "max": .., "mean": ..}`` of ``values`` (empty: NaN-free zeros)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {**{f"p{q:g}": 0.0 for q in qs}, "max": 0.0, "mean": 0.0, "n": 0}
    out = {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(arr, list(qs)), strict=True)}
    return {**out, "max": float(arr.max()), "mean": float(arr.mean()), "n": int(arr.size)}


@dataclass(slots=True)
class _Outcome:
    sent_at: float | None = None
    partition: int | None = None
    offset: int | None = None
    event_at: float | None = None
    events: int = 0
    level: str | None = None
    dead_at: float | None = None
    dead_letters: int = 0
    dead_reason: str | None = None

    @property
    def resolved(self) -> bool:
        return self.event_at is not None or self.dead_at is not None


@dataclass
class ReplayReport:
    """Everything a replay measured; :func:`write_report` stores it as JSON (and a PNG)."""

    run: dict[str, Any] = field(default_factory=dict)
    sent: int = 0
    acked: int = 0
    produce_errors: int = 0
    events: int = 0
    unique_events: int = 0
    duplicate_events: int = 0
    duplicate_event_ids: int = 0
    missing: int = 0
    missing_ids: list[str] = field(default_factory=list)
    dead_letters: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    duplicate_dead_letters: int = 0
    expected_dead_letters: dict[str, int] = field(default_factory=dict)
    unexpected_dead_letters: int = 0
    unexpected_dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    reason_mismatches: int = 0
    malformed_with_event: int = 0
    unmatched_dead_letters: int = 0
    foreign_events: int = 0
    source_mismatches: int = 0
    order_violations: int = 0
    cache_levels: dict[str, int] = field(default_factory=dict)
    cache_hit_rate: float = 0.0
    cache_hit_rate_by_level: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    throughput_events_per_s: float = 0.0
    steady_throughput_events_per_s: float = 0.0
    offered_rate_per_s: float | None = None
    achieved_send_rate_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    dead_letter_latency_ms: dict[str, float] = field(default_factory=dict)
    timeline: list[dict[str, float | None]] = field(default_factory=list)
    lag_samples: list[list[float]] = field(default_factory=list)
    max_lag: int = 0
    final_lag: int | None = None
    batches: int = 0
    stage_ms_mean: dict[str, float] = field(default_factory=dict)
    batch_summary: dict[str, float] = field(default_factory=dict)
    stage_records: list[dict[str, Any]] = field(default_factory=list)
    event_samples: list[dict[str, Any]] = field(default_factory=list)
    resource_samples: list[dict[str, float]] = field(default_factory=list)
    completed: bool = False
    timed_out: bool = False
    aborted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ReplayReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what the command prints and the benchmark tabulates)."""
        return {
            "sent": self.sent,
            "events": self.unique_events,
            "dead_letters": self.dead_letters,
            "missing": self.missing,
            "duplicates": self.duplicate_events,
            "unexpected_dead_letters": self.unexpected_dead_letters,
            "reason_mismatches": self.reason_mismatches,
            "throughput_events_per_s": round(self.throughput_events_per_s, 1),
            "steady_throughput_events_per_s": round(self.steady_throughput_events_per_s, 1),
            "p50_ms": round(self.latency_ms.get("p50", 0.0), 1),
            "p95_ms": round(self.latency_ms.get("p95", 0.0), 1),
            "p99_ms": round(self.latency_ms.get("p99", 0.0), 1),
            "max_ms": round(self.latency_ms.get("max", 0.0), 1),
            "cache_hit_rate": round(self.cache_hit_rate, 3),
            "max_lag": self.max_lag,
            "final_lag": self.final_lag,
            "completed": self.completed,
        }


class ReplayAccounting:
    """Matches what came back against what was sent (see the module docstring for the rules).

    Fed by :func:`run_replay` (or a test) with sends, broker acknowledgements, events, dead letters,
    stage metrics and lag samples; :meth:`report` turns it into a :class:`ReplayReport`.
    """

    def __init__(
        self,
        corpus: Corpus,
        *,
        input_topic: str,
        max_event_samples: int = 10_000,
        max_stage_records: int = 50_000,
    ) -> None:
        self.corpus = corpus
        self.input_topic = input_topic
        self.max_event_samples = max_event_samples
        self.max_stage_records = max_stage_records
        self._index = {m.message_id: m.index for m in corpus.messages}
        self._out = [_Outcome() for _ in corpus.messages]
        self._by_coords: dict[tuple[int, int], int] = {}
        self._pending_dead: dict[tuple[int, int], list[tuple[Mapping[str, Any], float]]] = defaultdict(list)
        self._event_ids: set[str] = set()
        self._failed: set[int] = set()
        self._last_offset_by_conversation: dict[str, int] = {}
        self.resolved = 0
        self.sent = 0
        self.acked = 0
        self.produce_errors = 0
        self.events = 0
        self.duplicate_events = 0
        self.duplicate_event_ids = 0
        self.duplicate_dead_letters = 0
        self.foreign_events = 0
        self.source_mismatches = 0
        self.order_violations = 0
        self.bad_output_records = 0
        self.model: dict[str, Any] | None = None
        self.not_before: float | None = None  # stage metrics emitted earlier belong to another run
        self.stage_records: list[dict[str, Any]] = []
        self.event_samples: list[dict[str, Any]] = []
        self.lag_samples: list[tuple[float, int]] = []
        self.resource_samples: list[dict[str, float]] = []

    @property
    def done(self) -> bool:
        """Every message has an event or a dead letter, or can never get one (its produce failed)."""
        return self.resolved + len(self._failed - self._resolved_failed()) >= len(self._out)

    def _resolved_failed(self) -> set[int]:
        return {i for i in self._failed if self._out[i].resolved}

    @property
    def dead_letters(self) -> int:
        return sum(1 for o in self._out if o.dead_at is not None)

    # --------------------------------------------------------------------- feeding
    def on_sent(self, index: int, at: float) -> None:
        self._out[index].sent_at = at
        self.sent += 1

    def on_produce_error(self, index: int) -> None:
        self.produce_errors += 1
        self._failed.add(index)

    def on_acked(self, index: int, partition: int, offset: int) -> None:
        out = self._out[index]
        out.partition, out.offset = partition, offset
        self._by_coords[(partition, offset)] = index
        self.acked += 1
        for doc, received_at in self._pending_dead.pop((partition, offset), []):
            self._match_dead(index, doc, received_at)

    def on_event(self, doc: Mapping[str, Any], received_at: float) -> None:
        index = self._index.get(str(doc.get("message_id")))
        if index is None:
            self.foreign_events += 1
            return
        out = self._out[index]
        self.events += 1
        event_id = str(doc.get("event_id"))
        if event_id in self._event_ids:
            self.duplicate_event_ids += 1
        self._event_ids.add(event_id)
        source = doc.get("source")
        if (
            isinstance(source, Mapping)
            and out.offset is not None
            and (source.get("partition") != out.partition or source.get("offset") != out.offset)
        ):
            self.source_mismatches += 1
        if out.events:
            self.duplicate_events += 1
            out.events += 1
            return
        out.events = 1
        out.event_at = received_at
        if self.model is None and isinstance(doc.get("model"), Mapping):
            self.model = dict(doc["model"])
        cache = doc.get("cache")
        out.level = str(cache.get("level")) if isinstance(cache, Mapping) else "none"
        if out.dead_at is None:
            self.resolved += 1
        if isinstance(source, Mapping) and isinstance(source.get("offset"), int):
            conv = self.corpus.messages[index].conversation_id
            last = self._last_offset_by_conversation.get(conv)
            if last is not None and source["offset"] < last:
                self.order_violations += 1
            self._last_offset_by_conversation[conv] = max(last or 0, source["offset"])
        self._sample_event(index, doc, out)

    def on_dead_letter(self, doc: Mapping[str, Any], received_at: float) -> None:
        source = doc.get("source")
        if not isinstance(source, Mapping) or source.get("topic") != self.input_topic:
            self._pending_dead[(-1, -1)].append((doc, received_at))
            return
        coords = (int(source.get("partition", -1)), int(source.get("offset", -1)))
        index = self._by_coords.get(coords)
        if index is None:
            self._pending_dead[coords].append((doc, received_at))
            return
        self._match_dead(index, doc, received_at)

    def _match_dead(self, index: int, doc: Mapping[str, Any], received_at: float) -> None:
        out = self._out[index]
        if out.dead_at is not None:
            self.duplicate_dead_letters += 1
            return
        out.dead_at = received_at
        out.dead_reason = str(doc.get("reason"))
        out.dead_letters = 1
        if out.event_at is None:
            self.resolved += 1

    def on_stage_metrics(self, doc: Mapping[str, Any], received_at: float) -> None:
        emitted = parse_rfc3339(doc.get("emitted_at"))
        if self.not_before is not None and emitted is not None and emitted < self.not_before:
            return  # a batch of an earlier run (e.g. the warm-up) that finished after we started reading
        if len(self.stage_records) < self.max_stage_records:
            self.stage_records.append({**doc, "received_at": received_at})

    def on_lag(self, at: float, lag: int) -> None:
        self.lag_samples.append((at, lag))

    def on_resources(self, at: float, sample: Mapping[str, float]) -> None:
        self.resource_samples.append({"t": at, **sample})

    def _sample_event(self, index: int, doc: Mapping[str, Any], out: _Outcome) -> None:
        if len(self.event_samples) >= self.max_event_samples:
            # keep an even spread over the run: replace a random earlier sample (reservoir sampling)
            j = random.randrange(self.resolved or 1)
            if j >= self.max_event_samples:
                return
            target: int | None = j
        else:
            target = None
        timings = doc.get("timings_ms")
        sample = {
            "message_id": self.corpus.messages[index].message_id,
            "level": out.level,
            "timings_ms": dict(timings) if isinstance(timings, Mapping) else {},
            "e2e_ms": (out.event_at - out.sent_at) * 1e3 if out.event_at and out.sent_at else None,
            "to_worker_ms": _to_worker_ms(doc, out.sent_at),
            "sent_at": out.sent_at,
        }
        if target is None:
            self.event_samples.append(sample)
        else:
            self.event_samples[target] = sample

    # --------------------------------------------------------------------- report
    def missing_indexes(self) -> list[int]:
        return [i for i, o in enumerate(self._out) if not o.resolved]

    def report(
        self,
        *,
        started_at: float,
        finished_at: float,
        timed_out: bool = False,
        aborted: str | None = None,
        offered_rate_per_s: float | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> ReplayReport:
        msgs = self.corpus.messages
        outs = self._out
        missing = self.missing_indexes()
        reasons: Counter[str] = Counter()
        unexpected: Counter[str] = Counter()
        mismatches = 0
        malformed_with_event = 0
        for m, o in zip(msgs, outs, strict=True):
            if o.dead_reason is not None:
                reasons[o.dead_reason] += 1
                if not m.malformed:
                    unexpected[o.dead_reason] += 1
                elif o.dead_reason != m.expected_reason:
                    mismatches += 1
            if m.malformed and o.event_at is not None:
                malformed_with_event += 1
        levels = Counter(o.level for o in outs if o.event_at is not None and o.level is not None)
        unique_events = sum(levels.values())
        hits = sum(n for lvl, n in levels.items() if lvl != "none")
        latencies = [(o.event_at - o.sent_at) * 1e3 for o in outs if o.event_at is not None and o.sent_at]
        dead_lat = [(o.dead_at - o.sent_at) * 1e3 for o in outs if o.dead_at is not None and o.sent_at]
        arrivals = sorted(o.event_at for o in outs if o.event_at is not None)
        sends = sorted(o.sent_at for o in outs if o.sent_at is not None)
        first_send = sends[0] if sends else started_at
        end = arrivals[-1] if arrivals else finished_at
        duration = max(1e-9, end - first_send)
        steady = _steady_rate(arrivals)
        send_span = (sends[-1] - sends[0]) if len(sends) > 1 else 0.0
        stage_means = {
            s: float(np.mean([float(r["stage_ms"][s]) for r in self.stage_records])) if self.stage_records else 0.0
            for s in STAGE_FIELDS
        }
        unmatched = sum(len(v) for v in self._pending_dead.values())
        lag = [[round(t - started_at, 3), float(n)] for t, n in self.lag_samples]
        return ReplayReport(
            run={
                **(run or {}),
                "corpus": self.corpus.describe(),
                "started_at": started_at,
                "finished_at": finished_at,
                "bad_output_records": self.bad_output_records,
                "model": self.model,
            },
            sent=self.sent,
            acked=self.acked,
            produce_errors=self.produce_errors,
            events=self.events,
            unique_events=unique_events,
            duplicate_events=self.duplicate_events,
            duplicate_event_ids=self.duplicate_event_ids,
            missing=len(missing),
            missing_ids=[msgs[i].message_id for i in missing[:50]],
            dead_letters=sum(reasons.values()),
            dead_letters_by_reason=dict(reasons),
            duplicate_dead_letters=self.duplicate_dead_letters,
            expected_dead_letters=self.corpus.expected_dead_letters(),
            unexpected_dead_letters=sum(unexpected.values()),
            unexpected_dead_letter_reasons=dict(unexpected),
            reason_mismatches=mismatches,
            malformed_with_event=malformed_with_event,
            unmatched_dead_letters=unmatched,
            foreign_events=self.foreign_events,
            source_mismatches=self.source_mismatches,
            order_violations=self.order_violations,
            cache_levels=dict(levels),
            cache_hit_rate=hits / unique_events if unique_events else 0.0,
            cache_hit_rate_by_level={
                lvl: levels.get(lvl, 0) / unique_events if unique_events else 0.0 for lvl in ("l1", "l2", "batch")
            },
            duration_s=duration,
            throughput_events_per_s=unique_events / duration if unique_events else 0.0,
            steady_throughput_events_per_s=steady,
            offered_rate_per_s=offered_rate_per_s,
            achieved_send_rate_per_s=(len(sends) - 1) / send_span if send_span > 0 else 0.0,
            latency_ms=percentiles(latencies),
            dead_letter_latency_ms=percentiles(dead_lat),
            timeline=_timeline(outs, first_send, end),
            lag_samples=lag,
            max_lag=int(max((n for _, n in self.lag_samples), default=0)),
            final_lag=int(self.lag_samples[-1][1]) if self.lag_samples else None,
            batches=len(self.stage_records),
            stage_ms_mean=stage_means,
            batch_summary=_batch_summary(self.stage_records),
            stage_records=list(self.stage_records),
            event_samples=list(self.event_samples),
            resource_samples=list(self.resource_samples),
            completed=not missing,
            timed_out=timed_out,
            aborted=aborted,
        )


def _to_worker_ms(doc: Mapping[str, Any], sent_at: float | None) -> float | None:
    """Produce call to the worker reading the message (its ``received_at``, millisecond precision)."""
    read = parse_rfc3339(doc.get("received_at"))
    if read is None or sent_at is None:
        return None
    return max(0.0, (read - sent_at) * 1e3)


def _steady_rate(arrivals: Sequence[float]) -> float:
    """Arrivals per second between the 10th and 90th percentile arrival (ramp-up and tail excluded)."""
    n = len(arrivals)
    if n < 10:
        span = arrivals[-1] - arrivals[0] if n > 1 else 0.0
        return (n - 1) / span if span > 0 else 0.0
    lo, hi = int(n * 0.1), int(n * 0.9)
    span = arrivals[hi] - arrivals[lo]
    return (hi - lo) / span if span > 0 else 0.0


def _timeline(outs: Sequence[_Outcome], start: float, end: float) -> list[dict[str, float | None]]:
    """Per time window: messages sent, events received, and latency percentiles of the messages sent in it
    (None where nothing sent in the window came back)."""
    span = max(0.0, end - start)
    window = max(1.0, span / 120.0)
    n = int(span // window) + 1
    sent = [0] * n
    received = [0] * n
    lat: list[list[float]] = [[] for _ in range(n)]
    for o in outs:
        if o.sent_at is not None:
            w = min(n - 1, max(0, int((o.sent_at - start) // window)))
            sent[w] += 1
            if o.event_at is not None:
                lat[w].append((o.event_at - o.sent_at) * 1e3)
        if o.event_at is not None:
            received[min(n - 1, max(0, int((o.event_at - start) // window)))] += 1
    rows: list[dict[str, float | None]] = []
    for w in range(n):
        # the last window is cut off at the end of the run: divide by the part that elapsed
        length = max(1e-3, min(window, span - w * window)) if w == n - 1 else window
        p = percentiles(lat[w]) if lat[w] else None
        rows.append(
            {
                "t_s": w * window,
                "window_s": length,
                "sent_per_s": sent[w] / length,
                "events_per_s": received[w] / length,
                "p50_ms": p["p50"] if p else None,
                "p95_ms": p["p95"] if p else None,
                "p99_ms": p["p99"] if p else None,
            }
        )
    return rows


def _batch_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    if not records:
        return {}
    sizes = [float(r["size"]) for r in records]
    real = sum(float(r["real_tokens"]) for r in records)
    padded = sum(float(r["padded_tokens"]) for r in records)
    return {
        "batches": float(len(records)),
        "mean_size": float(np.mean(sizes)),
        "max_size": max(sizes),
        "mean_padded_tokens": padded / len(records),
        "mean_real_tokens": real / len(records),
        "padding_waste": 1.0 - real / padded if padded else 0.0,
        "mean_token_budget": float(np.mean([float(r["token_budget"]) for r in records])),
    }


# ------------------------------------------------------------------------------------------------- run
class ReplayTopics(Protocol):
    """The four topic names (``TopicSettings`` fits)."""

    @property
    def input(self) -> str: ...

    @property
    def events(self) -> str: ...

    @property
    def metrics(self) -> str: ...

    @property
    def dead_letters(self) -> str: ...


async def _partitions(admin: Any, topic: str) -> list[Any]:
    """The topic's partitions, from the cluster metadata (a consumer without a subscription has none)."""
    from aiokafka import TopicPartition

    for _ in range(50):
        for desc in await admin.describe_topics([topic]):
            if desc.get("topic") == topic and desc.get("error_code") == 0 and desc.get("partitions"):
                return [TopicPartition(topic, int(p["partition"])) for p in sorted(desc["partitions"],
                        key=lambda p: int(p["partition"]))]  # fmt: skip
        await asyncio.sleep(0.1)
    raise DataError(f"topic {topic!r} does not exist on the cluster")


async def _lag(admin: Any, consumer: Any, group: str, parts: Sequence[Any], start: Mapping[Any, int]) -> int:
    committed = await admin.list_consumer_group_offsets(group, partitions=list(parts))
    ends = await consumer.end_offsets(list(parts))
    total = 0
    for tp in parts:
        meta = committed.get(tp)
        position = meta.offset if meta is not None and meta.offset >= 0 else start[tp]
        total += max(0, ends[tp] - position)
    return total


async def run_replay(
    kafka: KafkaTarget,
    topics: ReplayTopics,
    corpus: Corpus,
    rate_per_s: float | None,
    group_id_to_watch: str | None,
    timeout_s: float,
    progress: bool = True,
    *,
    producers: int = 1,
    linger_s: float = 2.0,
    resource_probe: Callable[[], Mapping[str, float] | None] | None = None,
    should_abort: Callable[[], str | None] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> ReplayReport:
    """Produce ``corpus`` to ``topics.input`` and account for every message (see the module docstring).

    Args:
        kafka: the cluster's settings (security included), or a bare bootstrap string for a PLAINTEXT one.
        topics: where to produce and what to read back.
        corpus: from :func:`build_corpus`.
        rate_per_s: offered messages per second, or None/0 for as fast as the producer goes.
        group_id_to_watch: consumer group whose lag on the input topic is sampled once a second.
        timeout_s: give up (and report what is missing) after this long.
        progress: show a rich progress bar on stderr.
        producers: concurrent producer tasks; each owns a share of the conversations (so a conversation's
            messages keep their order) and all keep to one global schedule.
        linger_s: keep reading this long after the last message resolved (trailing stage metrics, late
            duplicates, the lag draining).
        resource_probe: called once a second (in a thread); its mapping is stored as a resource sample.
        should_abort: called a few times a second; a non-None string stops the run (e.g. the worker died).
        run_info: extra fields stored in the report's ``run``.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    acc = ReplayAccounting(corpus, input_topic=topics.input)
    producer: Any = None
    cluster = as_kafka_settings(kafka)
    consumer = AIOKafkaConsumer(
        **aiokafka_client_kwargs(cluster, client_id="emotion-stream-replay"), group_id=None, enable_auto_commit=False
    )
    admin = AIOKafkaAdminClient(**aiokafka_client_kwargs(cluster, client_id="emotion-stream-replay-admin"))
    await consumer.start()
    await admin.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        out_parts = []
        for topic in (topics.events, topics.dead_letters, topics.metrics):
            out_parts += await _partitions(admin, topic)
        in_parts = await _partitions(admin, topics.input)
        # read from the current end of each output topic: nothing of an earlier run, nothing of ours lost
        ends = await consumer.end_offsets(out_parts)
        consumer.assign(out_parts)
        for tp, offset in ends.items():
            consumer.seek(tp, offset)
        start_offsets: dict[Any, int] = dict(await consumer.end_offsets(in_parts))
        producer = await open_producer(cluster)
        started = time.time()
        acc.not_before = started
        deadline = time.monotonic() + timeout_s
        sending_done = asyncio.Event()
        state = {"sent_done_at": 0.0}

        async def consume_loop() -> None:
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                now = time.time()
                for tp, records in batch.items():
                    for rec in records:
                        try:
                            doc = orjson.loads(rec.value or b"null")
                        except orjson.JSONDecodeError:
                            acc.bad_output_records += 1
                            continue
                        if not isinstance(doc, dict):
                            acc.bad_output_records += 1
                        elif tp.topic == topics.events:
                            acc.on_event(doc, now)
                        elif tp.topic == topics.dead_letters:
                            acc.on_dead_letter(doc, now)
                        else:
                            acc.on_stage_metrics(doc, now)

        async def produce_share(share: list[CorpusMessage], t0: float) -> None:
            for msg in share:
                if rate_per_s:
                    delay = t0 + msg.index / rate_per_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                key, value = msg.record()
                at = time.time()
                try:
                    fut = await producer.send(topics.input, value=value, key=key)
                except KafkaError:
                    acc.on_produce_error(msg.index)
                    continue
                acc.on_sent(msg.index, at)
                fut.add_done_callback(lambda f, i=msg.index: _on_ack(acc, i, f))
                if not rate_per_s and msg.index % 200 == 0:
                    await asyncio.sleep(0)  # let the consumer and the progress bar run

        async def produce_all_shares() -> None:
            n_tasks = max(1, min(producers, len(corpus) or 1))
            shares: list[list[CorpusMessage]] = [[] for _ in range(n_tasks)]
            owner: dict[str, int] = {}
            for msg in corpus.messages:
                k = owner.setdefault(msg.conversation_id, len(owner) % n_tasks)
                shares[k].append(msg)
            t0 = time.monotonic()
            await asyncio.gather(*(produce_share(s, t0) for s in shares if s))
            await producer.flush()
            state["sent_done_at"] = time.time()
            sending_done.set()

        async def sample_loop() -> None:
            while True:
                now = time.time()
                if group_id_to_watch:
                    with contextlib.suppress(KafkaError, OSError, TimeoutError):  # loses one sample only
                        acc.on_lag(now, await _lag(admin, consumer, group_id_to_watch, in_parts, start_offsets))
                if resource_probe is not None:
                    sample = await asyncio.to_thread(resource_probe)
                    if sample is not None:
                        acc.on_resources(now - started, sample)
                await asyncio.sleep(max(0.0, 1.0 - (time.time() - now)))

        tasks = [
            asyncio.create_task(consume_loop(), name="replay-consume"),
            asyncio.create_task(produce_all_shares(), name="replay-produce"),
            asyncio.create_task(sample_loop(), name="replay-sample"),
        ]
        timed_out = False
        aborted: str | None = None
        with _progress_bar(progress, len(corpus)) as update:
            while True:
                await asyncio.sleep(0.2)
                lag = acc.lag_samples[-1][1] if acc.lag_samples else None
                update(acc.resolved, acc.sent, acc.events, acc.dead_letters, lag)
                for task in tasks:
                    failure = task.exception() if task.done() and not task.cancelled() else None
                    if failure is not None:
                        raise failure
                if acc.done and sending_done.is_set():
                    break
                if should_abort is not None and (aborted := should_abort()) is not None:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
            if not timed_out and aborted is None:
                await asyncio.sleep(linger_s)
                update(acc.resolved, acc.sent, acc.events, acc.dead_letters, acc.lag_samples[-1][1]
                       if acc.lag_samples else None)  # fmt: skip
        finished = time.time()
    finally:
        for task in tasks:
            task.cancel()
        # a task's own failure was raised above; here only their ends are collected
        await asyncio.gather(*tasks, return_exceptions=True)
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await producer.stop()
        await consumer.stop()
        await admin.close()
    info = {
        **(run_info or {}),
        "bootstrap": cluster.bootstrap_servers,
        "topics": {"input": topics.input, "events": topics.events, "metrics": topics.metrics,
                   "dead_letters": topics.dead_letters},
        "group": group_id_to_watch,
        "producers": producers,
        "timeout_s": timeout_s,
        "sending_finished_at": state["sent_done_at"],
    }  # fmt: skip
    return acc.report(
        started_at=started,
        finished_at=finished,
        timed_out=timed_out,
        aborted=aborted,
        offered_rate_per_s=rate_per_s or None,
        run=info,
    )


def _on_ack(acc: ReplayAccounting, index: int, fut: asyncio.Future[Any]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        acc.on_produce_error(index)
        return
    meta = fut.result()
    acc.on_acked(index, int(meta.partition), int(meta.offset))


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        yield lambda *args: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total)

        def update(resolved: int, sent: int, events: int, dead: int, lag: int | None) -> None:
            lag_text = "-" if lag is None else str(lag)
            bar.update(task, completed=resolved, description=f"sent {sent} events {events} dlq {dead} lag {lag_text}")

        yield update


# ----------------------------------------------------------------------------------------------- output
def write_report(report: ReplayReport, path_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<prefix>.json`` (everything) and ``<prefix>.png`` (latency, throughput and lag over time)."""
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    png_path = prefix.with_name(prefix.name + ".png")
    json_path.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    _plot(report, png_path)
    return json_path, png_path


def read_report(path: str | Path) -> ReplayReport:
    """Load a report written by :func:`write_report` (``path`` with or without ``.json``)."""
    p = Path(path)
    if p.suffix != ".json":
        p = p.with_name(p.name + ".json")
    return ReplayReport.from_dict(orjson.loads(p.read_bytes()))


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _plot(report: ReplayReport, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 9), layout="constrained")
    ax_lat, ax_tp, ax_lag = fig.subplots(3, 1, sharex=True)
    rows = report.timeline
    t = [_nan(r["t_s"]) for r in rows]
    for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        ax_lat.plot(t, [_nan(r[key]) for r in rows], style, label=key.replace("_ms", ""))
    ax_lat.set_ylabel("end-to-end latency (ms)")
    ax_lat.set_title(
        f"replay: {report.sent} sent, {report.unique_events} events, {report.dead_letters} dead letters, "
        f"{report.missing} missing; p99 {report.latency_ms.get('p99', 0):.0f} ms"
    )
    ax_lat.legend(loc="upper left")
    ax_lat.grid(alpha=0.3)
    ax_tp.plot(t, [_nan(r["events_per_s"]) for r in rows], label="events/s (received)")
    ax_tp.plot(t, [_nan(r["sent_per_s"]) for r in rows], "--", label="messages/s (offered)")
    ax_tp.set_ylabel("per second")
    ax_tp.legend(loc="upper left")
    ax_tp.grid(alpha=0.3)
    if report.lag_samples:
        ax_lag.plot([s[0] for s in report.lag_samples], [s[1] for s in report.lag_samples], color="tab:red")
    else:
        ax_lag.text(0.5, 0.5, "no lag samples (no group watched)", ha="center", transform=ax_lag.transAxes)
    ax_lag.set_ylabel("consumer lag (messages)")
    ax_lag.set_xlabel("seconds since the first send")
    ax_lag.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
