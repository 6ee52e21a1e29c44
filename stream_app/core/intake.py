"""Intake: turn fetched records into slots, deciding on the spot the ones that are bad.

One pass per chunk, plain Python on a list: size guard, decode and validate against ``chat_message.v1``
(:func:`~stream_app.records.decode_chat_message`), normalise and bound the text, derive the cache key,
read the W3C trace context (headers first, then the body's ``traceparent``).
A record that fails any of it gets a :class:`~stream_app.core.slots.DeadInfo` (its dead letter is built by
the emitter); a failure of a kind nobody foresaw is still that record's alone (reason ``schema``, stage
``validate``), never the worker's. Shared with the baseline consumer in ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_app.cache.keys import ModelIdentity, normalise, normalised_key
from stream_app.core.headers import read_trace_context
from stream_app.core.slots import ChunkInfo, DeadInfo, Lane, RecordLike, Slot
from stream_app.errors import DecodeError, InputError, TextTooLongError
from stream_app.records import decode_chat_message

__all__ = ["Intake"]


class Intake:
    """Decode and validate chunks of records.

    Args:
        max_message_bytes: A value larger than this is dead-lettered (``too_large``) without decoding.
        max_text_chars: Texts longer than this (after normalisation, in code points) are cut to it, or
            dead-lettered (``text_too_long``) when ``overlong_reject``.
        overlong_reject: Reject over-long texts instead of truncating them.
        identity: The model identity the cache keys are derived from; None leaves ``cache_key`` unset
            (no cache and no in-batch de-duplication).
    """

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_text_chars: int,
        overlong_reject: bool,
        identity: ModelIdentity | None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_text_chars = max_text_chars
        self.overlong_reject = overlong_reject
        self.identity = identity

    def accept(self, lane: Lane, records: Sequence[RecordLike], chunk: ChunkInfo) -> list[Slot]:
        """One slot per record, in the given (delivery) order; bad ones carry their ``dead`` verdict."""
        slots: list[Slot] = []
        append = slots.append
        limit = self.max_message_bytes
        for rec in records:
            slot = Slot(lane, rec.offset, rec.timestamp, rec.key, rec.value, rec.headers or (), chunk)
            append(slot)
            value = rec.value
            if value is not None and len(value) > limit:
                error = DecodeError(f"{len(value)} bytes is over the {limit}-byte limit")
                slot.dead = DeadInfo("too_large", "decode", error)
                continue
            try:
                self._decide(slot, value)
            except InputError as exc:
                stage = "decode" if isinstance(exc, DecodeError) else "validate"
                slot.dead = DeadInfo(exc.reason, stage, exc)
            # Broad on purpose: whatever else a value makes validation raise belongs to that record alone.
            except Exception as exc:  # noqa: BLE001
                slot.dead = DeadInfo("schema", "validate", exc)
        return slots

    def _decide(self, slot: Slot, value: bytes | None) -> None:
        message = decode_chat_message(value)
        text = normalise(message.text)
        if len(text) > self.max_text_chars:
            if self.overlong_reject:
                raise TextTooLongError(f"{len(text)} characters is over max_text_chars={self.max_text_chars}")
            text = text[: self.max_text_chars]
        slot.message = message
        slot.text = text
        if slot.headers or message.traceparent is not None:
            slot.trace = read_trace_context(slot.headers, message.traceparent)
        if self.identity is not None:
            slot.cache_key = normalised_key(text, self.identity)
