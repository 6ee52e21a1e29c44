"""The crash ledger through the pipeline: who would get a strike if the process died right now.

Found by the fuzz work (tests/integration/test_robustness_kafka.py, a tokenizer that aborts on one text):
a suspect was isolated for inference but tokenised with its whole chunk, so a crash in the tokenizer
struck every record of the chunk and, after ``max_strikes`` crashes, all of them were dead-lettered as
``crash_loop``. Tokenised alone, its call still overlapped a batch in the engine (and its lone inference
overlapped other chunks in the tokenizer): those records were struck too. And a batch whose inference
raised (a Python exception, not a crash) stayed "in native code" in the ledger for the life of the process.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stream_app.core.crash_ledger import CrashLedger
from stream_app.inference.tokenize import Encoded
from tests.unit.core.fakes import FakeEncoder, FakeEngine, ListSink, Rec, build, raw

pytestmark = pytest.mark.unit


class StallingEncoder(FakeEncoder):
    """Blocks inside ``encode`` on a text holding "stall" until released: the moment a crash would hit."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        if any("stall" in t for t in texts):
            self.entered.set()
            self.release.wait(10)
        return super().encode(texts)


def _in_flight(path: Path) -> list[list[object]]:
    doc = json.loads(path.read_text())
    runs: list[list[object]] = doc["in_flight"]
    return runs


async def test_a_suspect_is_tokenised_alone_so_a_tokenizer_crash_strikes_only_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    # the previous process died with offset 2 in native code once
    path.write_text(json.dumps({"in_flight": [], "strikes": [["in", 0, 2, 1]]}))
    ledger = CrashLedger(path, max_strikes=3)
    encoder = StallingEncoder()
    sink = ListSink()
    p = build(sink, encoder=encoder, ledger=ledger, l1=False)
    await p.start()
    try:
        chunk = [Rec(o, raw(o, "stall here" if o == 2 else f"innocent text {o}")) for o in range(6)]
        await p.feed("in", {0: chunk})
        assert await asyncio.to_thread(encoder.entered.wait, 5)
        # the tokenizer is inside the suspect's text now: if it killed the process, only offset 2 is struck
        assert _in_flight(path) == [["in", 0, 2, 2]]
        encoder.release.set()
        assert await p.drain(5)
    finally:
        encoder.release.set()
        await p.stop()
    assert sorted(d["source"]["offset"] for d in sink.docs("events")) == list(range(6))


async def test_a_batch_whose_inference_raised_is_no_longer_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = CrashLedger(path)
    sink = ListSink()
    p = build(sink, ledger=ledger, l1=False)
    await p.start()
    try:
        # "poison" makes the fake engine raise: the batch fails, then the record fails alone (inference_failed)
        await p.feed("in", {0: [Rec(o, raw(o, "this is poison" if o == 1 else f"fine {o}")) for o in range(4)]})
        assert await p.drain(5)
        assert [d["reason"] for d in sink.docs("dlq")] == ["inference_failed"]
        # nothing is in native code any more: a crash now must strike nobody
        assert _in_flight(path) == []
    finally:
        await p.stop()
    assert CrashLedger(path).has_suspects is False


class StallingEngine(FakeEngine):
    """Blocks inside ``predict`` on a batch of ``stall_rows`` rows until released (0: never blocks)."""

    def __init__(self, stall_rows: int) -> None:
        super().__init__()
        self.stall_rows = stall_rows
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, batch: Any) -> Any:
        if batch.size == self.stall_rows:
            self.entered.set()
            self.release.wait(10)
        return super().predict(batch)


async def test_a_suspects_tokenisation_waits_for_running_batches(tmp_path: Path) -> None:
    """While a suspect is in the tokenizer, no batch is in the engine (a crash then strikes only it)."""
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"in_flight": [], "strikes": [["in", 1, 0, 1]]}))
    encoder = StallingEncoder()
    engine = StallingEngine(stall_rows=3)
    p = build(ListSink(), encoder=encoder, engine=engine, ledger=CrashLedger(path, max_strikes=3), l1=False)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(o, raw(o, f"innocent text {o}")) for o in range(3)]})
        assert await asyncio.to_thread(engine.entered.wait, 5)  # a batch of three is in the engine
        await p.feed("in", {1: [Rec(0, raw(100, "stall here"))]})  # the suspect arrives
        await asyncio.sleep(0.2)
        assert not encoder.entered.is_set(), "the suspect was tokenised while a batch was in the engine"
        engine.release.set()
        assert await asyncio.to_thread(encoder.entered.wait, 5)
        assert _in_flight(path) == [["in", 1, 0, 0]]
        encoder.release.set()
        assert await p.drain(5)
    finally:
        engine.release.set()
        encoder.release.set()
        await p.stop()


async def test_a_suspects_inference_keeps_other_chunks_out_of_the_tokenizer(tmp_path: Path) -> None:
    """While a suspect is in the engine, no other text is in the tokenizer."""
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"in_flight": [], "strikes": [["in", 0, 0, 1]]}))
    encoder = StallingEncoder()
    engine = StallingEngine(stall_rows=1)
    p = build(ListSink(), encoder=encoder, engine=engine, ledger=CrashLedger(path, max_strikes=3), l1=False)
    await p.start()
    try:
        await p.feed("in", {0: [Rec(0, raw(0, "the suspect"))]})
        assert await asyncio.to_thread(engine.entered.wait, 5)  # the suspect is in the engine, alone
        encoder.release.set()  # (the next text would stall the tokenizer only if it got there)
        await p.feed("in", {1: [Rec(0, raw(1, "stall here please")), Rec(1, raw(2, "and this"))]})
        await asyncio.sleep(0.2)
        assert not encoder.entered.is_set(), "another chunk was tokenised while the suspect was in the engine"
        assert _in_flight(path) == [["in", 0, 0, 0]]
        engine.release.set()
        assert await p.drain(5)
        assert encoder.entered.is_set()
    finally:
        engine.release.set()
        encoder.release.set()
        await p.stop()
