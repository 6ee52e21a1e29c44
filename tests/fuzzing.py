"""Generated input records for the fuzz suites, and the checks of what the worker made of them.

Every field of ``chat_message.v1`` at its extremes, valid and invalid (timestamps at years 0001/9999 with
offsets, lower-case ``t``/``z``, long fractions; unicode: non-BMP, NUL, control characters, combining
marks, RTL, emoji, noncharacters, lone surrogate escapes; lengths at the 256 boundary; texts of 1..20,000
characters; values at the ``max_message_bytes`` boundary), wire-level breakage (BOM, invalid UTF-8, NaN,
1e400, nesting past 1024, duplicate members), tombstones, non-JSON bytes, huge and odd Kafka keys, odd
headers. Each record comes with the outcome the *contract* predicts, computed independently of the worker
(the standard library's ``json`` and ``jsonschema`` draft 2020-12 with its format checker).

One generator serves both suites through a :class:`Chooser`: hypothesis draws in the unit suite (so a
failure shrinks), a seeded :class:`random.Random` in the 10,000-record integration run.

:func:`check_outputs` holds the invariant both suites assert: each input record yields exactly one
output (an event or a dead letter with the predicted reason), every output validates against its schema
and fits the producer's limit with its key and headers, and what an output says about its input is true.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jsonschema
import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

T = TypeVar("T")

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
REASONS = (
    "undecodable",
    "too_large",
    "schema",
    "empty_text",
    "text_too_long",
    "inference_failed",
    "output_failed",
    "crash_loop",
)


def validator(name: str) -> Any:
    """A draft 2020-12 validator of ``schemas/<name>.json`` with the format checker on."""
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


CHAT = validator("chat_message.v1")
EVENT = validator("emotion_event.v1")
DEAD = validator("dead_letter.v1")
STAGE = validator("stage_metrics.v1")


# ------------------------------------------------------------------------------------------------ choosers
class Chooser(Protocol):
    """Where the generator's choices come from."""

    def pick(self, options: Sequence[T]) -> T: ...

    def integer(self, lo: int, hi: int) -> int: ...


class RandomChooser:
    """Choices from a seeded :class:`random.Random` (reproducible without hypothesis)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class DrawChooser:
    """Choices drawn by hypothesis (``draw`` of an ``st.composite``), so failures shrink."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        from hypothesis import strategies as st

        self._draw = draw
        self._st = st

    def pick(self, options: Sequence[T]) -> T:
        return self._draw(self._st.sampled_from(options))  # type: ignore[no-any-return]

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ pools
WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()] + ["\ufeff"]
CONTROL = [chr(c) for c in (*range(0x00, 0x09), 0x0E, 0x1B, 0x7F, 0x80, 0x9F)]
COMBINING = ["\u0301", "\u0308", "\u20dd", "\u0489", "\ufe0f", "\u200d", "\u0e49", "\u036f"]
RTL = ["\u202e", "\u202b", "\u200f", "\u05d0", "\u0627", "\u061c", "\u2067", "\u05e9\u05dc\u05d5\u05dd"]
NON_BMP = ["😀", "\U0001f469\u200d\U0001f4bb", "\U0010ffff", "\U00020000", "𝕏", "\U0001f1fa\U0001f1f8", "🏳️‍🌈"]
ODD = ["\u200b", "\u2060", "\ufffe", "\uffff", "\ufdd0", "\ufffd", "\u0000", "\\", '"', "</script>", "%s", "{}"]
CJK = ["中", "日本語", "한국어", "ｶﾀｶﾅ"]
WORDS = [
    "I", "love", "this", "so", "much", "hate", "you", "lol", "wow", "what", "a", "surprise", "I'm", "scared",
    "disgusting", "thanks", "ok", "sad", "today", "never", "again", "great", "game", "!", "?", "...",
]  # fmt: skip
COMMON_TEXTS = [
    "I love this so much!",
    "This is disgusting.",
    "ok",
    "I'm so scared right now",
    "wow, what a surprise",
    "thanks!",
    "I hate you",
]
TEXT_PIECES: list[str] = [
    *WORDS, *WORDS, *CONTROL, *COMBINING, *RTL, *NON_BMP, *ODD, *CJK, " ", " ", "\n", "\t", "\u3000", "\u00a0",
]  # fmt: skip
ID_UNITS = ["a", "é", "😀", "\U0010ffff", "中", "\x00", "\n", " ", "\u202e", "e\u0301", "\x7f", "\ufeff"]
LENGTH_EDGES = [1, 2, 64, 128, 255, 256, 257, 300, 511, 512, 513, 9_999, 10_000, 10_001, 20_000]
DATES_OK = ["0001-01-01", "0001-01-02", "9999-12-31", "9999-12-30", "2000-02-29", "2024-02-29", "1970-01-01",
            "2026-11-30", "1900-02-28", "2100-12-31"]  # fmt: skip
DATES_BAD = ["0000-01-01", "1900-02-29", "2023-02-29", "2026-04-31", "2026-13-01", "10000-01-01", "2026-1-01"]
TIMES_OK = ["00:00:00", "23:59:59", "12:34:56", "00:00:01"]
TIMES_BAD = ["24:00:00", "23:60:00", "23:59:60", "1:00:00", "12:00"]
SEPS_OK = ["T", "t"]
SEPS_BAD = [" ", "_", ""]
FRACTIONS_OK = ["", "", ".0", ".9", ".999", ".9999999", "." + "9" * 30, ".123456789012345678901234567890"]
FRACTIONS_BAD = [".", ",5"]
OFFSETS_OK = ["Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+14:00", "-12:00", "+05:30", "-00:01", "+00:01"]
OFFSETS_BAD = ["+24:00", "+0100", "", "UTC", "+01:60", "Zz", "+1:00"]
TAILS_BAD = ["\n", " ", "x", "\u2028"]
TRACEPARENT_OK = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACEPARENTS = [
    TRACEPARENT_OK,
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # pattern-valid, W3C-invalid
    "00-00000000000000000000000000000000-0000000000000000-00",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case: schema rejects
    TRACEPARENT_OK + "\n",
    "",
    None,
]
WRONG_TYPES: list[Any] = [None, 0, 7.0, -1, True, False, [], ["a"], {}, {"a": "b"}, 2**70, 1e308]
EXTRAS: list[dict[str, Any]] = [
    {"lang": "en"},
    {"n": 2**70, "m": -(2**70), "f": 1e308, "g": -5e-324},
    {"": None, "😀": ["\x00", {"a": [1, 2.5, None]}]},
    {"k" * 100_000: 1},
    {"schema": "emotion_event.v1", "label": "joy", "message_id_": "x"},
]
NON_OBJECT = [b"[1, 2, 3]", b'"just a string"', b"42", b"null", b"true", b"[]", b'[{"text": "hi"}]']
GARBAGE = [
    b"",
    b"{",
    b"{not json at all",
    b"\xff\xfe\xfa invalid utf-8",
    b"conv-demo-3",
    b"\x00" * 16,
    b'{"message_id": "m", }',
    b"\xef\xbb\xbf{}",
    bytes(range(256)),
]
HEADER_NAMES = ["traceparent", "TraceParent", "tracestate", "", "x", "ünï", "\x00", "😀", "k" * 300, "content-type",
                "ce_id", "dlq_reason"]  # fmt: skip
TRACESTATE_LONG = ",".join(f"k{i}=" + "v" * 250 for i in range(40)).encode()
HEADER_VALUES: list[bytes | None] = [
    None,
    b"",
    TRACEPARENT_OK.encode(),
    TRACEPARENT_OK.upper().encode(),
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    b"\xff\xfe\xfd",
    b"\x00" * 10,
    b"v" * 10_000,
    b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    TRACESTATE_LONG,
    b"k=v,k=v",
]
SWAPPED_KEY = orjson.dumps(
    {"message_id": "m", "conversation_id": "conv-demo-3", "user_id": "u", "text": "x" * 450_000,
     "sent_at": "2026-01-01T00:00:00Z"}
)  # fmt: skip
KEYS: list[bytes | None] = [
    None,
    b"",
    b"conv-1",
    "😀".encode() * 256,  # 1,024 bytes: kept as the dead letter's key
    b"k" * 1025,  # one over: hashed
    b"\xff\xfe\x00\x01",
    bytes(range(256)) * 8,
]


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class FuzzInput:
    """One input record and what the contract says should become of it.

    Attributes:
        kind: The generator branch (for the summary).
        key, value, headers, timestamp: The Kafka record.
        expect: ``event``, or the dead-letter reason the contract predicts (before the text-length policy,
            which :func:`expected_outcome` applies).
        doc: The document as a JSON reader sees it (last duplicate member wins), when it is an object.
    """

    kind: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp: int = 1_767_225_600_000
    expect: str = "event"
    doc: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"FuzzInput({self.describe(120)})"

    def describe(self, n: int = 300) -> str:
        value = self.value if self.value is None else self.value[:n]
        key = self.key if self.key is None else self.key[:60]
        size = None if self.value is None else len(self.value)
        headers = [(h, (v or b"")[:40]) for h, v in self.headers]
        return f"{self.kind}: key={key!r} value({size} B)={value!r} headers={headers}"


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


def contract_verdict(doc: Any) -> str:
    """What chat_message.v1 and its wire rules make of a JSON value (independent of the worker)."""
    if _has_surrogate(doc):
        return "undecodable"
    if not isinstance(doc, dict):
        return "schema"
    errors = list(CHAT.iter_errors(doc))
    if not errors:
        return "event"
    if all(list(e.absolute_path) == ["text"] and e.validator == "pattern" for e in errors):
        return "empty_text"
    return "schema"


def _repeat_to(unit: str, n: int) -> str:
    return (unit * (n // max(1, len(unit)) + 1))[:n] if unit else ""


def _text(c: Chooser, texts: Sequence[str]) -> Any:
    mode = c.pick(
        ["words"] * 4
        + ["common"] * 3
        + ["dataset", "dataset", "pieces", "pieces", "long", "long", "edge", "edge", "blank", "bad"]
    )
    if mode == "dataset" and texts:
        return c.pick(texts)
    if mode in ("common", "dataset"):
        return c.pick(COMMON_TEXTS)
    if mode == "words":
        return " ".join(c.pick(WORDS) for _ in range(c.integer(1, 12)))
    if mode == "pieces":
        return "".join(c.pick(TEXT_PIECES) for _ in range(c.integer(1, 24)))
    if mode == "long":  # up to 20,000 characters, around max_text_chars and the 128-token limit
        unit = "".join(c.pick(TEXT_PIECES) for _ in range(c.integer(1, 8)))
        return _repeat_to(unit or "x", c.pick(LENGTH_EDGES))
    if mode == "edge":  # one unusual character, repeated to an edge length
        return _repeat_to(c.pick([*CONTROL, *COMBINING, *RTL, *NON_BMP, *ODD, *CJK]), c.pick(LENGTH_EDGES[:8]))
    if mode == "blank":
        return "".join(c.pick(WHITESPACE) for _ in range(c.integer(0, 6)))
    return c.pick([*WRONG_TYPES, "a\ud800", "\udc00", "\ud83d", "x\udfff\ud800y"])


def _id(c: Chooser) -> Any:
    mode = c.pick(["plain"] * 12 + ["edge"] * 5 + ["mixed"] * 3 + ["bad"])
    if mode == "plain":
        return f"id-{c.integer(0, 10**6)}"
    if mode == "edge":  # 1, 255, 256, 257 code points of one unit (256 emoji = 1,024 UTF-8 bytes)
        return _repeat_to(c.pick(ID_UNITS), c.pick([1, 2, 255, 256, 256, 256, 257]))
    if mode == "mixed":
        return "".join(c.pick(ID_UNITS) for _ in range(c.integer(1, 20)))
    return c.pick([*WRONG_TYPES, "", "\ud800", "a" * 1000])


def _sent_at(c: Chooser) -> Any:
    good = c.integer(0, 19) > 1

    def part(ok: Sequence[str], bad: Sequence[str]) -> str:
        return c.pick(ok) if good or c.integer(0, 4) else c.pick(bad)

    if not good and c.integer(0, 5) == 0:
        return c.pick([*WRONG_TYPES, "", "now", "2026-11-30T10:00:00Z\n", "2026-W48-1T10:00:00Z"])
    value = (
        part(DATES_OK, DATES_BAD)
        + part(SEPS_OK, SEPS_BAD)
        + part(TIMES_OK, TIMES_BAD)
        + part(FRACTIONS_OK, FRACTIONS_BAD)
        + part(OFFSETS_OK, OFFSETS_BAD)
    )
    return value if good or c.integer(0, 3) else value + c.pick(TAILS_BAD)


def _document(c: Chooser, texts: Sequence[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, make in (("message_id", _id), ("conversation_id", _id), ("user_id", _id)):
        if c.integer(0, 80):
            doc[name] = make(c)
    if c.integer(0, 80):
        doc["text"] = _text(c, texts)
    if c.integer(0, 80):
        doc["sent_at"] = _sent_at(c)
    if c.integer(0, 3) == 0:
        doc["traceparent"] = c.pick(TRACEPARENTS[:3] * 3 + TRACEPARENTS[3:])
    if c.integer(0, 5) == 0:
        extra = c.pick(EXTRAS)
        doc = {**extra, **doc} if c.integer(0, 1) else {**doc, **extra}
    return doc


def _encode(c: Chooser, doc: Any) -> bytes:
    how = c.pick(["orjson", "orjson", "ascii", "utf8"])
    if how == "orjson" and not _has_surrogate(doc):
        try:
            return orjson.dumps(doc)
        except orjson.JSONEncodeError:  # integers beyond 64 bits: orjson refuses to write them
            pass
    return json.dumps(doc, ensure_ascii=how == "ascii").encode("utf-8", "surrogatepass")


def _append(raw: bytes, member: bytes) -> bytes:
    return raw[:-1] + (b"," if raw.rstrip() != b"{}" else b"") + member + b"}"


# (name, edit of the encoded object, what it does to the verdict: a reason, or a change of the document)
WIRE_EDITS: list[tuple[str, Callable[[bytes], bytes], str | dict[str, Any] | None]] = [
    ("bom", lambda raw: b"\xef\xbb\xbf" + raw, "undecodable"),
    ("trailing whitespace", lambda raw: raw + b" \r\n\t", None),
    ("trailing garbage", lambda raw: raw + b"x", "undecodable"),
    ("NaN", lambda raw: _append(raw, b'"x":NaN'), "undecodable"),
    ("1e400", lambda raw: _append(raw, b'"x":1e400'), "undecodable"),
    ("invalid utf-8", lambda raw: _append(raw, b'"x":"\xff"'), "undecodable"),
    ("encoded surrogate", lambda raw: _append(raw, b'"x":"\xed\xa0\x80"'), "undecodable"),
    ("surrogate escape", lambda raw: _append(raw, b'"x":"\\udc00"'), "undecodable"),
    ("raw control char", lambda raw: _append(raw, b'"x":"\x01"'), "undecodable"),
    # the message object is level 1: a member nested 1023 deep is the deepest allowed
    ("depth 1024", lambda raw: _append(raw, b'"x":' + b"[" * 1023 + b"]" * 1023), None),
    ("depth 1025", lambda raw: _append(raw, b'"x":' + b"[" * 1024 + b"]" * 1024), "undecodable"),
    ("escaped pair", lambda raw: _append(raw, b'"x":"\\ud83d\\ude00"'), None),
    ("NUL escape", lambda raw: _append(raw, b'"x":"\\u0000"'), None),
    ("duplicate blank text", lambda raw: _append(raw, b'"text":"  "'), {"text": "  "}),
    ("duplicate text", lambda raw: _append(raw, b'"text":"dup"'), {"text": "dup"}),
    ("duplicate sent_at", lambda raw: _append(raw, b'"sent_at":"9999-12-31t23:59:59.9999z"'),
     {"sent_at": "9999-12-31t23:59:59.9999z"}),
]  # fmt: skip


def gen_headers(c: Chooser) -> tuple[tuple[str, bytes | None], ...]:
    if c.integer(0, 2):
        return ()
    return tuple((c.pick(HEADER_NAMES), c.pick(HEADER_VALUES)) for _ in range(c.integer(1, 5)))


def _key(c: Chooser, doc: dict[str, Any] | None, heavy: bool = True) -> bytes | None:
    if c.integer(0, 3) and doc is not None and isinstance(doc.get("conversation_id"), str):
        conv: str = doc["conversation_id"]
        return conv.encode("utf-8", "surrogatepass")
    if heavy and c.integer(0, 40) == 0:
        return SWAPPED_KEY
    return c.pick(KEYS)


def _sized(c: Chooser, limit: int) -> FuzzInput:
    """A valid document padded to exactly limit - 1, limit or limit + 1 bytes (or far over)."""
    target = c.pick([limit - 1, limit, limit + 1, 600_000])
    doc = {
        "message_id": "m",
        "conversation_id": "c-size",
        "user_id": "u",
        "text": "",
        "sent_at": "2026-01-01T00:00:00Z",
    }
    base = len(orjson.dumps(doc))
    doc["text"] = "a" * (target - base)
    value = orjson.dumps(doc)
    assert len(value) == target
    return FuzzInput("size", b"c-size", value, expect="event", doc=doc)


def gen_input(
    c: Chooser, *, texts: Sequence[str] = (), max_message_bytes: int = 262_144, heavy_every: int = 1
) -> FuzzInput:
    """One record of a mixed stream: mostly documents (valid or not), plus every kind of breakage.

    ``heavy_every``: the records of hundreds of kilobytes (the ``size`` kind, swapped keys) come that many
    times less often (a stream of thousands over a real broker needs them, but not one in twenty).
    """
    heavy = heavy_every <= 1 or c.integer(1, heavy_every) == 1
    kind = c.pick(["doc"] * 14 + ["wire", "wire", "non-object", "garbage", "tombstone"] + ["size", "swapped"] * heavy)
    headers = gen_headers(c)
    if kind == "doc":
        doc = _document(c, texts)
        value = _encode(c, doc)
        return FuzzInput(kind, _key(c, doc, heavy), value, headers, expect=contract_verdict(doc), doc=doc)
    if kind == "wire":
        doc = _document(c, texts)
        raw = _encode(c, doc)
        name, edit, effect = c.pick(WIRE_EDITS)
        value = edit(raw)
        broken = _has_surrogate(doc)  # the bytes keep an encoded or escaped lone surrogate whatever follows
        if isinstance(effect, dict):
            doc = {**doc, **effect}
        expect = "undecodable" if broken else effect if isinstance(effect, str) else contract_verdict(doc)
        return FuzzInput(f"wire:{name}", _key(c, doc, heavy), value, headers, expect=expect, doc=doc)
    if kind == "non-object":
        return FuzzInput(kind, _key(c, None, heavy), c.pick(NON_OBJECT), headers, expect="schema")
    if kind == "garbage":
        return FuzzInput(kind, _key(c, None, heavy), c.pick(GARBAGE), headers, expect="undecodable")
    if kind == "tombstone":
        return FuzzInput(kind, c.pick(KEYS[1:]), None, headers, expect="undecodable")
    if kind == "size":
        sized = _sized(c, max_message_bytes)
        return FuzzInput(sized.kind, sized.key, sized.value, headers, expect="event", doc=sized.doc)
    # a producer that swapped key and value (issue 15): a 450 KB JSON key, an 11-byte value
    return FuzzInput("swapped", SWAPPED_KEY, b"conv-demo-3", headers, expect="undecodable")


def expected_outcome(
    inp: FuzzInput,
    *,
    max_message_bytes: int,
    max_text_chars: int,
    overlong_reject: bool,
    token_truncated: Callable[[str], bool] | None = None,
) -> str:
    """``event`` or the dead-letter reason for ``inp`` under these limits (too_large first, as the worker)."""
    if inp.value is None:
        return "undecodable"
    if len(inp.value) > max_message_bytes:
        return "too_large"
    if inp.expect != "event" or not overlong_reject:
        return inp.expect
    from stream_app.cache.keys import normalise  # the documented rule: length after NFC and collapsing

    assert inp.doc is not None
    text = normalise(inp.doc["text"])
    if len(text) > max_text_chars:
        return "text_too_long"
    if token_truncated is not None and token_truncated(text):
        return "text_too_long"
    return "event"


# ------------------------------------------------------------------------------------------------ named
def _doc(**fields: Any) -> dict[str, Any]:
    return {"message_id": "m", "conversation_id": "c", "user_id": "u", "text": "hi", "sent_at": "2026-01-01T00:00:00Z",
            **fields}  # fmt: skip


def _named(kind: str, doc: dict[str, Any], key: bytes | None = b"c", **kw: Any) -> FuzzInput:
    return FuzzInput(
        kind, key, json.dumps(doc, ensure_ascii=False).encode(), expect=contract_verdict(doc), doc=doc, **kw
    )


def named_extremes() -> list[FuzzInput]:
    """Issue 15's kinds by name: values at every edge the output path meets, a swapped key, odd headers."""
    emoji_256 = "\U0001f600" * 256
    return [
        _named("ids at 256 four-byte characters",
               _doc(message_id=emoji_256, conversation_id=emoji_256, user_id=emoji_256), key=emoji_256.encode()),
        _named("ids at 256 U+10FFFF", _doc(message_id="\U0010ffff" * 256, conversation_id="\U0010ffff" * 256)),
        _named("id at 257 characters", _doc(conversation_id="a" * 257)),
        _named("ids of NUL and controls", _doc(message_id="\x00", conversation_id="\x00\x01\x1f\x7f", user_id="\n")),
        _named("year 0001 east of UTC", _doc(sent_at="0001-01-01T00:00:00.999999999+23:59")),
        _named("year 9999 west of UTC", _doc(sent_at="9999-12-31t23:59:59.999999999999999999-23:59")),
        _named("lower-case t and z, 30 fraction digits", _doc(sent_at="2026-11-30t10:00:00." + "9" * 30 + "z")),
        _named("leap day 2000", _doc(sent_at="2000-02-29T12:00:00-00:00")),
        _named("leap second", _doc(sent_at="2016-12-31T23:59:60Z")),
        _named("text of 20,000 emoji", _doc(text="\U0001f469\u200d\U0001f4bb" * 6_667)),
        _named("text of 20,000 combining marks", _doc(text="e" + "\u0301" * 19_999)),
        _named("text RTL override and NUL", _doc(text="\u202eabc\x00\u05d0\u0627")),
        _named("text of one noncharacter", _doc(text="\uffff")),
        _named("text of U+FEFF only", _doc(text="\ufeff\ufeff")),
        _named("text of U+001C only", _doc(text="\x1c")),
        _named("traceparent all zeros", _doc(traceparent="00-" + "0" * 32 + "-" + "0" * 16 + "-00")),
        _named("huge member name", _doc(**{"k" * 200_000: 1})),
        _named("huge integer extra", _doc(n=2**70)),
        FuzzInput("tombstone with a 1,025-byte key", b"k" * 1025, None, expect="undecodable"),
        FuzzInput("swapped key and value (issue 15)", SWAPPED_KEY, b"conv-demo-3", expect="undecodable"),
        FuzzInput("odd headers", b"c", orjson.dumps(_doc()), expect="event", doc=_doc(),
                  headers=(("traceparent", TRACEPARENT_OK.encode()), ("traceparent", None), ("", b"\xff" * 5000),
                           ("tracestate", TRACESTATE_LONG), ("\x00", None))),
        FuzzInput("a valid traceparent header with a 10 kB tracestate", b"c", orjson.dumps(_doc()), expect="event",
                  doc=_doc(),
                  headers=(("traceparent", TRACEPARENT_OK.encode()), ("tracestate", b"a=" + b"b" * 10_000))),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Output:
    """One record the worker produced: which output it is, where it came from, and the record."""

    kind: str  # "event" or "dead_letter"
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]]


@dataclass
class Tally:
    """What a suite tried and what came of it."""

    inputs: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    cache_levels: Counter[str] = field(default_factory=Counter)
    largest_output: int = 0

    def line(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds.most_common())
        outcomes = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()))
        levels = ", ".join(f"{k} {n}" for k, n in sorted(self.cache_levels.items()))
        return (
            f"{self.inputs} inputs ({kinds}); outcomes: {outcomes}; event cache levels: {levels}; "
            f"largest output record {self.largest_output} B"
        )


def record_size(key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """The record's size as aiokafka's producer counts it against ``max_request_size``."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


_INSTANT = re.compile(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


_RENDERED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:Z|[+-]\d\d:\d\d)")
_LAST_MS = datetime(9999, 12, 31, 23, 59, 59, 999000) - datetime(1, 1, 1)


def instant_ms(text: str) -> timedelta:
    """An RFC 3339 date-time as the time since 0001-01-01T00:00Z, truncated to milliseconds (no overflow)."""
    m = _INSTANT.fullmatch(text.upper())
    assert m is not None, text
    base = datetime.fromisoformat(f"{m[1]}T{m[2]}") - datetime(1, 1, 1)
    ms = int((m[3] or "0")[:3].ljust(3, "0"))
    off = m[4]
    minutes = 0 if off == "Z" else (1 if off[0] == "+" else -1) * (int(off[1:3]) * 60 + int(off[4:6]))
    return base + timedelta(milliseconds=ms) - timedelta(minutes=minutes)


def check_outputs(
    inputs: dict[tuple[int, int], tuple[FuzzInput, str]],
    outputs: dict[tuple[int, int], list[Output]],
    *,
    max_record_bytes: int,
    tally: Tally | None = None,
) -> list[str]:
    """The invariant, per source coordinates ``(partition, offset)``; returns every problem found.

    ``inputs`` maps each input's coordinates to the record and its expected outcome (``event`` or a
    reason); ``outputs`` maps source coordinates (as the outputs state them) to what was produced.
    """
    problems = [
        f"{coords}: outputs for no input: {[o.kind for o in outputs[coords]]}"
        for coords in sorted(set(outputs) - set(inputs))
    ]
    for coords, (inp, expect) in sorted(inputs.items()):
        got = outputs.get(coords, [])
        where = f"{coords} [{inp.describe()}]"
        if len(got) != 1:
            problems.append(f"{where}: expected one output ({expect}), got {len(got)}: {[o.kind for o in got]}")
            continue
        out = got[0]
        size = record_size(out.key, out.value, out.headers)
        if tally is not None:
            tally.inputs += 1
            tally.kinds[inp.kind.split(":")[0]] += 1
            tally.expected[expect] += 1
            tally.largest_output = max(tally.largest_output, size)
        if size > max_record_bytes:
            problems.append(f"{where}: {out.kind} record of {size} B is over max_record_bytes={max_record_bytes}")
        if not all(isinstance(n, str) and isinstance(v, bytes | None) for n, v in out.headers):
            problems.append(f"{where}: malformed headers {out.headers!r}")
        try:
            doc = orjson.loads(out.value)
        except orjson.JSONDecodeError as exc:
            problems.append(f"{where}: output is not JSON ({exc})")
            continue
        if out.kind == "event":
            if tally is not None:
                tally.outcomes["event"] += 1
                tally.cache_levels[str(doc.get("cache", {}).get("level"))] += 1
            problems.extend(f"{where}: {p}" for p in _check_event(inp, expect, out, doc))
        else:
            if tally is not None:
                tally.outcomes[str(doc.get("reason"))] += 1
            problems.extend(f"{where}: {p}" for p in _check_dead_letter(inp, expect, out, doc, max_record_bytes))
    return problems


def _check_event(inp: FuzzInput, expect: str, out: Output, doc: dict[str, Any]) -> list[str]:
    problems = [f"event invalid: {e.message} at {list(e.absolute_path)}" for e in EVENT.iter_errors(doc)]
    if expect != "event":
        problems.append(f"expected a dead letter ({expect}), got an event")
        return problems
    if problems:
        return problems
    src = inp.doc
    assert src is not None
    problems.extend(
        f"{name} {doc[name]!r} is not the input's {src[name]!r}"
        for name in ("message_id", "conversation_id", "user_id")
        if doc[name] != src[name]
    )
    if doc["traceparent"] != src.get("traceparent"):
        problems.append(f"traceparent {doc['traceparent']!r} is not the input's {src.get('traceparent')!r}")
    if out.key != src["conversation_id"].encode():
        problems.append(f"key {out.key!r} is not the conversation id")
    sent_at = doc["sent_at"]
    if instant_ms(sent_at) != instant_ms(src["sent_at"]):
        problems.append(f"sent_at {sent_at} is not the instant {src['sent_at']}")
    # emotion_event.v1: milliseconds, in UTC unless that instant falls outside years 0001-9999
    in_range = timedelta(0) <= instant_ms(src["sent_at"]) <= _LAST_MS
    if _RENDERED.fullmatch(sent_at) is None or (in_range and not sent_at.endswith("Z")):
        problems.append(f"sent_at {sent_at!r} is not rendered as the contract says (from {src['sent_at']!r})")
    scores: dict[str, float] = doc["scores"]
    if doc["label"] != max(scores, key=scores.__getitem__) or doc["score"] != scores[doc["label"]]:
        problems.append(f"label {doc['label']} / score {doc['score']} is not the top of {scores}")
    if abs(sum(scores.values()) - 1.0) > 1e-3:
        problems.append(f"scores sum to {sum(scores.values())}")
    headers = dict((n, v) for n, v in out.headers)
    if headers.get("ce_id") != doc["event_id"].encode():
        problems.append(f"ce_id header {headers.get('ce_id')!r} is not the event id")
    return problems


def _check_dead_letter(
    inp: FuzzInput, expect: str, out: Output, doc: dict[str, Any], max_record_bytes: int
) -> list[str]:
    problems = [f"dead letter invalid: {e.message} at {list(e.absolute_path)}" for e in DEAD.iter_errors(doc)]
    if problems:
        return problems
    reason = doc["reason"]
    if reason != expect:
        problems.append(
            f"dead letter {reason}/{doc['stage']} ({doc['error_class']}: {doc['error_message'][:300]}), "
            f"expected {expect}"
        )
    value = inp.value or b""
    if doc["raw_size_bytes"] != len(value):
        problems.append(f"raw_size_bytes {doc['raw_size_bytes']} != {len(value)}")
    if inp.value is None:
        if doc["raw_value_b64"] is not None:
            problems.append("a tombstone's raw_value_b64 is not null")
    elif doc["raw_value_b64"] is None:
        problems.append("raw_value_b64 is null for a record with a value (the minimal fallback dead letter)")
    else:
        kept = base64.b64decode(doc["raw_value_b64"])
        if not value.startswith(kept) or doc["raw_truncated"] != (len(kept) < len(value)):
            problems.append(f"raw value: {len(kept)} B kept of {len(value)}, truncated={doc['raw_truncated']}")
    if inp.key is None:
        if doc["raw_key_b64"] is not None or out.key is not None:
            problems.append("a record without a key got one in its dead letter")
    elif doc["raw_key_b64"] is None:
        problems.append("raw_key_b64 is null for a record with a key (the minimal fallback dead letter)")
    else:
        kept = base64.b64decode(doc["raw_key_b64"])
        if not inp.key.startswith(kept) or doc.get("raw_key_truncated", False) != (len(kept) < len(inp.key)):
            problems.append(f"raw key: {len(kept)} B kept of {len(inp.key)}")
        hashed = len(inp.key) > 1024
        want = b"sha256:" + hashlib.sha256(inp.key).hexdigest().encode() if hashed else inp.key
        if out.key != want or doc.get("key_hashed", False) != hashed:
            problems.append(
                f"dead letter key {(out.key or b'')[:80]!r} (hashed={doc.get('key_hashed')}), want {want[:80]!r}"
            )
    headers = dict((n, v) for n, v in out.headers)
    if headers.get("dlq_reason") != reason.encode():
        problems.append(f"dlq_reason header {headers.get('dlq_reason')!r}")
    return problems
