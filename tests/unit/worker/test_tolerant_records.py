"""tolerant_records: a header name that is not UTF-8 is read (U+FFFD), every other record as aiokafka reads it."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.worker import tolerant_records
from stream_app.worker.tolerant_records import TolerantMemoryRecords, read_batch

pytestmark = pytest.mark.unit

ORIGINAL = tolerant_records._MEMORY_RECORDS  # aiokafka's own (C) MemoryRecords
CODECS = [0, 1, 2, 3, 4]  # none, gzip, snappy, lz4, zstd


class _RawName(str):
    """A header name that encodes to arbitrary bytes: aiokafka's Python builder asks the name to encode
    itself, which is how a non-Java client's bytes reach the wire."""

    raw: bytes = b""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def _raw(name: bytes) -> _RawName:
    header = _RawName("x")
    header.raw = name
    return header


Record = tuple[bytes | None, bytes | None, list[tuple[Any, bytes | None]]]


def _batch(
    records: list[Record], *, base_offset: int = 0, codec: int = 0, timestamp_ms: int = 1_700_000_000_000
) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2, compression_type=codec, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1,
        batch_size=1 << 22,
    )  # fmt: skip
    for i, (key, value, headers) in enumerate(records):
        assert builder.append(i, timestamp=timestamp_ms + i, key=key, value=value, headers=headers) is not None
    buf = bytearray(builder.build())
    buf[0:8] = base_offset.to_bytes(8, "big", signed=True)  # the broker assigns the base offset
    return bytes(buf)


def _read_all(memory_records: Any) -> list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]]:
    out = []
    while memory_records.has_next():
        batch = memory_records.next_batch()
        if batch is None:
            break
        out.extend((r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch)
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_a_bad_header_name_mid_batch_is_read_with_replacement_and_nothing_is_lost(codec: int) -> None:
    good = [(f"k{i}".encode(), f"v{i}".encode(), [("traceparent", b"00-ab")]) for i in range(5)]
    records: list[Record] = [*good[:2], (b"k-odd", b"v-odd", [(_raw(b"\xff\xfe-name"), b"x")]), *good[2:]]
    data = _batch(good[:3], base_offset=10, codec=codec) + _batch(records, base_offset=13, codec=codec)
    with pytest.raises(UnicodeDecodeError):  # the bug this module exists for
        _read_all(ORIGINAL(data))
    got = _read_all(TolerantMemoryRecords(data))
    assert [r[0] for r in got] == list(range(10, 19))
    odd = got[3 + 2]
    assert (odd[2], odd[3]) == (b"k-odd", b"v-odd")
    assert odd[4] == [("\ufffd\ufffd-name", b"x")]
    assert odd[4][0][0].encode("utf-8")  # can travel on: no lone surrogates
    assert [r[2] for r in got] == [b"k0", b"k1", b"k2", b"k0", b"k1", b"k-odd", b"k2", b"k3", b"k4"]
    assert all(r[4] == [("traceparent", b"00-ab")] for i, r in enumerate(got) if i != 5)


def test_a_control_batch_is_read_with_next_as_the_fetcher_does() -> None:
    data = _batch([(b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00", [])], base_offset=7)
    batch = TolerantMemoryRecords(data).next_batch()
    record = next(batch)
    assert record.offset == 7 and record.key == b"\x00\x00\x00\x00"
    assert batch.base_offset == 7 and batch.next_offset == 8  # attributes come from aiokafka's batch


def test_a_partial_trailing_batch_is_left_for_the_next_fetch_as_aiokafka_does() -> None:
    whole = _batch([(b"k", b"v", [])], base_offset=0)
    data = whole + _batch([(b"k", b"v", [])], base_offset=1)[:-5]
    tolerant, original = TolerantMemoryRecords(data), ORIGINAL(data)
    assert _read_all(tolerant) == _read_all(original)
    assert tolerant.size_in_bytes() == original.size_in_bytes() == len(data)


def test_install_puts_the_tolerant_reader_where_the_fetcher_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiokafka_fetcher, "MemoryRecords", ORIGINAL)
    tolerant_records.install()
    assert aiokafka_fetcher.MemoryRecords is TolerantMemoryRecords


_bytes = st.one_of(st.none(), st.binary(max_size=64))
_headers = st.lists(st.tuples(st.text(max_size=12), _bytes), max_size=3)
_records = st.lists(st.tuples(_bytes, _bytes, _headers), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(st.tuples(_records, st.sampled_from(CODECS)), min_size=1, max_size=4), base=st.integers(0, 2**40)
)
def test_read_batch_reads_every_well_formed_batch_as_aiokafka_does(
    batches: list[tuple[list[Record], int]], base: int
) -> None:
    data, offset = b"", base
    for records, codec in batches:
        data += _batch(records, base_offset=offset, codec=codec)
        offset += len(records)
    expected = _read_all(ORIGINAL(data))
    assert _read_all(TolerantMemoryRecords(data)) == expected
    ours, pos = [], 0
    while pos < len(data):
        end = pos + 12 + int.from_bytes(data[pos + 8 : pos + 12], "big")
        ours += [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in read_batch(data[pos:end])]
        pos = end
    assert ours == expected


def test_the_fetcher_still_builds_its_record_sets_by_that_name() -> None:
    """install() only helps while aiokafka's fetcher looks ``MemoryRecords`` up at each fetch response."""
    import inspect

    assert "MemoryRecords(" in inspect.getsource(aiokafka_fetcher.Fetcher)
