"""Fuzz the real core pipeline with generated chat messages: each input, exactly one valid output that fits.

Hypothesis generates chunks of input records (:mod:`tests.fuzzing`: every field of chat_message.v1 at its
extremes, valid and invalid, wire breakage, tombstones, odd keys and headers) and feeds them through the
REAL :class:`~stream_app.core.pipeline.Pipeline` (intake, cache, classifier, emitter) with the REAL built
model (ONNX INT8 on the CPU, loaded once) and tokenizer, into a sink that keeps what it is given and refuses
what a broker would refuse (a record over ``max_record_bytes``). Pipeline settings vary per example:
``overlong`` truncate or reject, the smallest and the default record limit, L1 on or off; L2 is a dict
shared by the module, so later examples hit what earlier ones cached.

Invariant: each input yields exactly one output, an event or a dead letter with the reason the contract
predicts; every output validates against its schema (draft 2020-12, format checker) and fits the
producer limit with its key and headers; offsets become committable up to the last input of every
partition; ``on_fatal`` is never called. ``EMOTION_STREAM_FUZZ_EXAMPLES`` raises the example count for a
longer local run (default 300, about 25 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stream_app.assembly import build_pipeline as assemble
from stream_app.core.pipeline import Pipeline
from stream_app.core.slots import OutRecord
from stream_app.errors import ModelError, OutputRejectedError
from stream_app.inference.base import Engine
from stream_app.inference.select import SelectionReport
from stream_app.inference.tokenize import TextEncoder
from stream_app.metrics import Metrics
from stream_app.records import DEFAULT_MAX_RECORD_BYTES, MIN_MAX_RECORD_BYTES
from stream_app.service import Runtime
from stream_app.settings import Settings, load_settings
from tests.fuzzing import (
    STAGE,
    DrawChooser,
    FuzzInput,
    Output,
    Tally,
    check_outputs,
    expected_outcome,
    gen_input,
    named_extremes,
)
from tests.unit.core.fakes import DictL2, Rec

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("EMOTION_STREAM_FUZZ_EXAMPLES", "300"))
# A failing example is reported as generated: shrinking inputs of hundreds of kilobytes takes hypothesis more
# than five minutes. EMOTION_STREAM_FUZZ_SHRINK=1 shrinks it (locally, when the raw example is not clear).
PHASES = (
    tuple(Phase)
    if os.environ.get("EMOTION_STREAM_FUZZ_SHRINK") == "1"
    else (Phase.explicit, Phase.reuse, Phase.generate)
)
IN, EVENTS, DLQ, METRICS = "chat.messages.v1", "emotion.events.v1", "chat.messages.dlq.v1", "emotion.metrics.v1"


@dataclass
class Model:
    settings: Settings
    engine: Engine
    encoder: TextEncoder
    selection: SelectionReport
    ledger_dir: Path
    l2: DictL2


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    """The built model as the worker runs it on a CPU (ONNX INT8, one thread), loaded once."""
    from stream_app.inference.select import load_engine
    from stream_app.service import resolve_model_path

    s = load_settings()
    try:
        path = resolve_model_path(s)
    except ModelError as exc:  # the set-up script builds it; a missing model is a broken set-up, not a skip
        pytest.fail(f"{exc} (run scripts/setup.sh first)")
    encoder = TextEncoder.from_pretrained(path, max_length=s.model.max_length_tokens)
    engine, selection = load_engine(
        path,
        engine="onnx-int8",
        device="cpu",
        num_threads=1,
        cache_dir=s.data.cache_dir,
        parity_texts=(),
        encoder=encoder,
        benchmark=False,
    )
    with tempfile.TemporaryDirectory(prefix="fuzz-ledger-") as tmp:
        yield Model(s, engine, encoder, selection, Path(tmp), DictL2())
    engine.close()


class LimitSink:
    """A list sink that refuses, as a broker does, a batch holding a record over ``max_record_bytes``."""

    def __init__(self, max_record_bytes: int) -> None:
        from tests.fuzzing import record_size

        self.max_record_bytes = max_record_bytes
        self.size = record_size
        self.sent: list[tuple[str, OutRecord]] = []
        self.refused = 0

    async def send(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[list[int], asyncio.Future[int | None]]]:
        loop = asyncio.get_running_loop()
        out: list[tuple[list[int], asyncio.Future[int | None]]] = []
        for start in range(0, len(records), 16):
            idx = list(range(start, min(len(records), start + 16)))
            fut: asyncio.Future[int | None] = loop.create_future()
            part = [records[i] for i in idx]
            if any(self.size(r.key, r.value, r.headers) > self.max_record_bytes for r in part):
                self.refused += 1
                fut.set_exception(OutputRejectedError("MessageSizeTooLargeError"))
            else:
                self.sent.extend((topic, r) for r in part)
                fut.set_result(None)
            out.append((idx, fut))
        return out


def build_pipeline(
    m: Model, sink: LimitSink, *, overlong_reject: bool, l1: bool, always_admit: bool, fatal: list[BaseException]
) -> Pipeline:
    """The pipeline of the worker's own assembly (``stream_app.assembly.build_pipeline``), with the
    example's settings, the in-memory L2, and two batches in flight as on a GPU."""
    base = m.settings
    s = base.model_copy(
        update={
            "model": base.model.model_copy(update={"overlong": "reject" if overlong_reject else "truncate"}),
            "cache": base.cache.model_copy(
                update={
                    "l1_enabled": l1,
                    "l1_max_entries": 1000,
                    "l2_enabled": True,
                    "admission": "always" if always_admit else "second_sighting",
                }
            ),
            "kafka": base.kafka.model_copy(update={"max_request_size_bytes": sink.max_record_bytes}),
        }
    )
    rt = Runtime(
        settings=s, metrics=Metrics(), engine=m.engine, encoder=m.encoder, selection=m.selection,
        concurrent_batches=2,
    )  # fmt: skip
    built = assemble(s, rt, sink=sink, metrics=rt.metrics, on_fatal=fatal.append, l2=m.l2, state_dir=m.ledger_dir)
    return built.pipeline


@dataclass(frozen=True, repr=False)
class Scenario:
    """One example: records spread over three partitions (offsets from a base, with gaps), fed in chunks,
    and the pipeline's settings for it."""

    inputs: list[FuzzInput]
    partitions: list[int]
    base_offsets: dict[int, int]
    gap: int
    chunks: int
    overlong_reject: bool
    max_record_bytes: int
    l1: bool
    always_admit: bool
    settle: bool

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints this, not the fields
        printer.text(repr(self))

    def __repr__(self) -> str:
        inputs = "\n  ".join(f"p{p}: {i!r}" for i, p in zip(self.inputs, self.partitions, strict=True))
        return (
            f"Scenario(overlong_reject={self.overlong_reject}, max_record_bytes={self.max_record_bytes}, "
            f"l1={self.l1}, always_admit={self.always_admit}, settle={self.settle}, chunks={self.chunks}, "
            f"gap={self.gap}, base_offsets={self.base_offsets},\n  {inputs})"
        )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    chooser = DrawChooser(draw)
    n = draw(st.integers(1, 14))
    inputs = [gen_input(chooser) for _ in range(n)]
    return Scenario(
        inputs=inputs,
        partitions=[draw(st.integers(0, 2)) for _ in range(n)],
        base_offsets={p: draw(st.sampled_from([0, 7, 2**31, 2**63 - 1000])) for p in range(3)},
        gap=draw(st.sampled_from([1, 1, 1, 3])),  # 3: a compacted topic's gaps
        chunks=draw(st.integers(1, 3)),
        overlong_reject=draw(st.booleans()),
        max_record_bytes=draw(st.sampled_from([DEFAULT_MAX_RECORD_BYTES, MIN_MAX_RECORD_BYTES])),
        l1=draw(st.booleans()),
        always_admit=draw(st.booleans()),
        settle=draw(st.booleans()),
    )


async def run_scenario(m: Model, sc: Scenario, tally: Tally) -> None:
    sink = LimitSink(sc.max_record_bytes)
    fatal: list[BaseException] = []
    p = build_pipeline(m, sink, overlong_reject=sc.overlong_reject, l1=sc.l1, always_admit=sc.always_admit, fatal=fatal)
    s = m.settings
    per_partition: dict[int, list[Rec]] = {}
    expected: dict[tuple[int, int], tuple[FuzzInput, str]] = {}
    next_offset = dict(sc.base_offsets)

    def truncated(text: str) -> bool:
        return m.encoder.encode([text])[0].truncated

    for inp, part in zip(sc.inputs, sc.partitions, strict=True):
        offset = next_offset[part]
        next_offset[part] += sc.gap
        rec = Rec(offset, inp.value, key=inp.key, timestamp=inp.timestamp, headers=inp.headers)  # type: ignore[arg-type]
        per_partition.setdefault(part, []).append(rec)
        outcome = expected_outcome(
            inp,
            max_message_bytes=s.model.max_message_bytes,
            max_text_chars=s.model.max_text_chars,
            overlong_reject=sc.overlong_reject,
            token_truncated=truncated,
        )
        expected[(part, offset)] = (inp, outcome)
    # every chunk holds each partition's records in offset order, and chunks follow one another in order
    ordered: list[dict[int, list[Rec]]] = []
    for part, recs in per_partition.items():
        size = -(-len(recs) // sc.chunks)
        for i in range(0, len(recs), size):
            index = i // size
            while len(ordered) <= index:
                ordered.append({})
            ordered[index][part] = recs[i : i + size]

    await p.start()
    try:
        for chunk in ordered:
            await p.feed(IN, chunk)
            if sc.settle:  # let the chunk finish: later repeats hit L1/L2 instead of joining its batch
                await p.drain(60.0)
        drained = await p.drain(60.0)
        await asyncio.sleep(0.01)
        p.emitter.request_flush()
        await asyncio.sleep(0.01)
    finally:
        await p.stop()

    problems: list[str] = []
    if not drained:
        problems.append(f"not drained: {p.in_flight} in flight")
    if fatal or p.failed is not None:
        problems.append(f"on_fatal called: {fatal!r}")
    outputs: dict[tuple[int, int], list[Output]] = {}
    for topic, r in sink.sent:
        if topic == METRICS:
            errors = [e.message for e in STAGE.iter_errors(orjson.loads(r.value))]
            if errors:
                problems.append(f"stage metrics invalid: {errors}")
            continue
        doc = orjson.loads(r.value)
        src = doc["source"]
        assert src["topic"] == IN
        kind = "event" if topic == EVENTS else "dead_letter"
        outputs.setdefault((src["partition"], src["offset"]), []).append(Output(kind, r.key, r.value, r.headers))
    problems += check_outputs(expected, outputs, max_record_bytes=sc.max_record_bytes, tally=tally)
    want = {part: recs[-1].offset + 1 for part, recs in per_partition.items()}
    if p.committable() != want:
        problems.append(f"committable {p.committable()} != {want}")
    assert not problems, "\n".join(problems)


def test_every_generated_input_gets_exactly_one_valid_output_that_fits(
    model: Model, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally()
    examples = 0

    @settings(
        max_examples=EXAMPLES,
        phases=PHASES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(sc=scenarios())
    def fuzz(sc: Scenario) -> None:
        nonlocal examples
        examples += 1
        asyncio.run(run_scenario(model, sc, tally))

    fuzz()
    with capsys.disabled():
        print(f"\nfuzz pipeline: {examples} examples, {tally.line()}")
    # the suite means something only if the generator reached every kind of outcome
    assert tally.outcomes["event"] > tally.inputs // 5, tally.line()
    for reason in ("undecodable", "too_large", "schema", "empty_text", "text_too_long"):
        assert tally.outcomes[reason] > 0, (reason, tally.line())
    assert {"size", "wire", "garbage", "tombstone"} <= set(tally.kinds), tally.line()
    assert tally.cache_levels["none"] and (tally.cache_levels["l1"] + tally.cache_levels["l2"]), tally.line()


NAMED = named_extremes()


@pytest.mark.parametrize("max_record_bytes", [MIN_MAX_RECORD_BYTES, DEFAULT_MAX_RECORD_BYTES])
@pytest.mark.parametrize("overlong_reject", [False, True], ids=["truncate", "reject"])
def test_named_extremes_each_get_one_valid_output(model: Model, max_record_bytes: int, overlong_reject: bool) -> None:
    sc = Scenario(
        inputs=NAMED,
        partitions=[i % 2 for i in range(len(NAMED))],
        base_offsets={0: 2**63 - 100, 1: 0, 2: 0},
        gap=1,
        chunks=2,
        overlong_reject=overlong_reject,
        max_record_bytes=max_record_bytes,
        l1=True,
        always_admit=False,
        settle=False,
    )
    tally = Tally()
    asyncio.run(run_scenario(model, sc, tally))
    assert tally.inputs == len(NAMED)
    assert tally.outcomes["event"] >= 14, tally.line()
