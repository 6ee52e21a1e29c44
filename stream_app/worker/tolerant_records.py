"""Fetched record batches whose header names are not UTF-8 are read, not fatal.

The Kafka protocol types a record header's key as a UTF-8 ``string`` (KIP-82), and Java clients cannot
write anything else, but other clients (Go's, hand-rolled ones) can. aiokafka decodes header keys
strictly while it unpacks a fetched batch: one such record raises ``UnicodeDecodeError`` inside the
fetcher, Faust's fetch loop dies with it and the worker exits, and every restart meets the same
uncommitted record. One odd header must stay one record's business.

:func:`install` puts :class:`TolerantMemoryRecords` in place of aiokafka's ``MemoryRecords`` for the
fetcher (the one name the fetcher looks up per fetch response). It hands out aiokafka's own (C) batches
unchanged; only when one of them raises ``UnicodeDecodeError`` is the rest of that batch read by
:func:`read_batch`, this module's reader of the v2 record-batch format (Kafka's
``RecordBatch``/``Record`` layout, "Message format" in the Kafka protocol documentation), which decodes
header keys with ``errors="replace"`` (U+FFFD for each invalid byte, so the name can be encoded again
wherever it travels). Such a record then goes through the worker like any other; its event does not
carry input headers other than the trace context, so the replaced name is seen only in logs.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

from aiokafka import codec
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordPy

__all__ = ["TolerantMemoryRecords", "install", "read_batch"]

_log = logging.getLogger(__name__)

# baseOffset int64, batchLength int32, partitionLeaderEpoch int32, magic int8, crc uint32, attributes int16,
# lastOffsetDelta int32, baseTimestamp int64, maxTimestamp int64, producerId int64, producerEpoch int16,
# baseSequence int32, records count int32: 61 bytes
_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # baseOffset + batchLength: what precedes the length-counted part of any batch
_COMPRESSION_MASK = 0x07
_TIMESTAMP_TYPE_BIT = 0x08
_LOG_APPEND_TIME = 1
_DECODERS: dict[int, Callable[[bytes], bytes]] = {
    1: codec.gzip_decode,
    2: codec.snappy_decode,
    3: codec.lz4_decode,
    4: codec.zstd_decode,
}


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """One zig-zag varint (Protocol Buffers' encoding, as Kafka's records use) at ``pos``: (value, next pos).

    Raises:
        CorruptRecordException: the buffer ends inside the varint, or it is longer than 10 bytes.
    """
    shift = 0
    raw = 0
    for _ in range(10):
        if pos >= len(buf):
            raise CorruptRecordException("record ends inside a varint")
        byte = buf[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
    raise CorruptRecordException("varint longer than 10 bytes")


def _nullable(buf: bytes | memoryview, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(buf, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise CorruptRecordException("record ends inside a field")
    return bytes(buf[pos : pos + length]), pos + length


def read_batch(raw: bytes | memoryview) -> list[_DefaultRecordPy]:
    """The records of one v2 record batch, header keys decoded leniently.

    Args:
        raw: the whole batch as fetched, from its ``baseOffset`` to its last byte (``12 + batchLength``).

    Returns:
        aiokafka's record objects (offset, timestamp, timestamp type, key, value, headers as
        ``[(str, bytes | None)]``), in batch order; a header key that is not UTF-8 has U+FFFD for each
        invalid byte.

    Raises:
        CorruptRecordException: the batch is not a v2 batch, or its lengths do not add up.
    """
    if len(raw) < _BATCH_HEADER.size:
        raise CorruptRecordException("record batch shorter than its header")
    (base_offset, _length, _epoch, magic, _crc, attributes, _last_delta, first_ts, max_ts, _pid, _pepoch, _seq,
     count) = _BATCH_HEADER.unpack_from(raw, 0)  # fmt: skip
    if magic != 2:
        raise CorruptRecordException(f"record batch magic {magic}: only v2 batches carry headers")
    body: bytes | memoryview = memoryview(raw)[_BATCH_HEADER.size :]
    compression = attributes & _COMPRESSION_MASK
    if compression:
        decoder = _DECODERS.get(compression)
        if decoder is None:
            raise CorruptRecordException(f"unknown compression codec {compression}")
        body = decoder(bytes(body))
    timestamp_type = 1 if attributes & _TIMESTAMP_TYPE_BIT else 0
    records: list[_DefaultRecordPy] = []
    pos = 0
    for _ in range(count):
        length, pos = _varint(body, pos)
        end = pos + length
        _attrs, pos = _varint(body, pos)
        ts_delta, pos = _varint(body, pos)
        offset_delta, pos = _varint(body, pos)
        key, pos = _nullable(body, pos)
        value, pos = _nullable(body, pos)
        n_headers, pos = _varint(body, pos)
        if n_headers < 0:
            raise CorruptRecordException(f"negative header count {n_headers}")
        headers: list[tuple[str, bytes | None]] = []
        for _h in range(n_headers):
            name, pos = _nullable(body, pos)
            if name is None:
                raise CorruptRecordException("null header key")
            header_value, pos = _nullable(body, pos)
            headers.append((name.decode("utf-8", errors="replace"), header_value))
        if pos != end:
            raise CorruptRecordException(f"record length {length} does not match its fields")
        timestamp = max_ts if timestamp_type == _LOG_APPEND_TIME else first_ts + ts_delta
        records.append(_DefaultRecordPy(base_offset + offset_delta, timestamp, timestamp_type, key, value, headers))
    return records


class _TolerantBatch:
    """One of aiokafka's batches, iterated as aiokafka would, re-read by :func:`read_batch` on a bad header
    name (the records already handed out are skipped)."""

    __slots__ = ("_inner", "_raw", "_records")

    def __init__(self, inner: Any, raw: memoryview) -> None:
        self._inner = inner
        self._raw = raw
        self._records: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:  # base_offset, next_offset, producer_id, validate_crc, ...
        return getattr(self._inner, name)

    def __iter__(self) -> Iterator[Any]:
        if self._records is None:
            self._records = self._read()
        return self._records

    def __next__(self) -> Any:  # the fetcher reads a control batch's one record with next()
        return next(iter(self))

    def _read(self) -> Iterator[Any]:
        handed_out = 0
        try:
            for record in self._inner:  # aiokafka's own (C) reader; it decompresses in __iter__
                yield record
                handed_out += 1
        except UnicodeDecodeError as exc:
            _log.warning(
                "record batch at offset %d has a header name that is not UTF-8 (%s): read with U+FFFD for it",
                self._inner.base_offset,
                exc.reason,
            )
            yield from read_batch(self._raw)[handed_out:]


class TolerantMemoryRecords:
    """aiokafka's ``MemoryRecords`` over one fetch response's record set, each batch wrapped in a
    :class:`_TolerantBatch` that knows its raw bytes.

    Same interface as aiokafka's: ``has_next()``, ``next_batch()`` (``None`` when what is left is a partial
    batch, which the fetcher re-fetches), ``size_in_bytes()``.
    """

    __slots__ = ("_data", "_inner", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._inner = _MEMORY_RECORDS(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def next_batch(self) -> Any:
        batch = self._inner.next_batch()
        if batch is None:
            return None
        start = self._pos
        (length,) = struct.unpack_from(">i", self._data, start + 8)
        self._pos = start + _LOG_OVERHEAD + length
        return _TolerantBatch(batch, memoryview(self._data)[start : self._pos])


_MEMORY_RECORDS: Any = aiokafka_fetcher.MemoryRecords


def install() -> None:
    """Make aiokafka's fetcher read record sets through :class:`TolerantMemoryRecords` (idempotent; this
    process only)."""
    aiokafka_fetcher.MemoryRecords = TolerantMemoryRecords
