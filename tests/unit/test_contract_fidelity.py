"""The worker's verdict on a chat message agrees with the contract, and what it builds from one never fails.

The contract is over the bytes on the wire: ``schemas/chat_message.v1.json`` plus the wire rules in its
description (UTF-8 I-JSON without a BOM, finite doubles, nesting up to 1024, last duplicate member wins).
The oracle below is independent of the worker: the standard library's ``json`` module for the bytes (not
orjson, which the worker uses) and ``jsonschema`` (draft 2020-12, format checker on) for the document.

1. Fidelity: ``decode_chat_message(raw)`` succeeds exactly when the oracle accepts ``raw``, over documents
   generated from the schema's own property schemas (hypothesis-jsonschema), near misses of every field,
   values of any JSON type, and byte-level edits (BOM, lone surrogates, invalid UTF-8, NaN, huge numbers,
   deep nesting, duplicate members).
2. Totality: for every accepted document, the event's input-derived fields, the event (dummy scores), the
   dead letter, their headers and their JSON encodings are built without raising and validate.
3. Bounded dead letters: whatever the raw key and value sizes (0..5 MB), the dead letter's Kafka record,
   as aiokafka sizes it, fits the producer's limit.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from stream_app.core.headers import EventHeaders, TraceContext, dead_letter_headers, event_source, read_trace_context
from stream_app.errors import DecodeError, InputError, SchemaError
from stream_app.records import (
    DEFAULT_MAX_RECORD_BYTES,
    MAX_ORIGINAL_KEY_BYTES,
    MIN_MAX_RECORD_BYTES,
    NON_WHITESPACE_PATTERN,
    RFC3339_PATTERN,
    TRACEPARENT_PATTERN,
    CacheInfo,
    ChatMessage,
    DeadLetter,
    EmotionEvent,
    EventTimings,
    ModelInfo,
    SourceRef,
    decode_chat_message,
    event_inputs,
    parse_sent_at,
)

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


CHAT_SCHEMA: dict[str, Any] = json.loads((SCHEMAS / "chat_message.v1.json").read_text())
CHAT = _validator("chat_message.v1")
EVENT = _validator("emotion_event.v1")
DEAD = _validator("dead_letter.v1")
PROPS: list[str] = list(CHAT_SCHEMA["properties"])
REQUIRED: set[str] = set(CHAT_SCHEMA["required"])
MAX_DEPTH = 1024


# ------------------------------------------------------------------------------------------- the oracle
def _depth(text: str) -> int:
    """Deepest nesting of arrays/objects in a JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _i_json(value: Any) -> bool:
    """No lone surrogate in any string or name; every number finite as an IEEE double."""
    if isinstance(value, str):
        return not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return False
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_i_json(v) for v in value)
    assert isinstance(value, dict)
    return all(_i_json(k) and _i_json(v) for k, v in value.items())


@contextlib.contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def oracle(raw: bytes) -> bool:
    """Does ``raw`` satisfy chat_message.v1 and its wire rules? (Independent of the worker's code.)"""
    try:
        text = raw.decode("utf-8")  # strict: no invalid or surrogate-encoding sequences
    except UnicodeDecodeError:
        return False
    if text.startswith("\ufeff") or _depth(text) > MAX_DEPTH:
        return False
    with _recursion_limit(MAX_DEPTH * 8):
        try:
            doc = json.loads(text, parse_constant=_reject_constant)  # duplicate names: last wins
        except ValueError:
            return False
        return _i_json(doc) and bool(CHAT.is_valid(doc))


def worker_accepts(raw: bytes) -> bool:
    """The worker's verdict; anything but an InputError escapes and fails the test."""
    try:
        decode_chat_message(raw)
    except InputError:
        return False
    return True


# ------------------------------------------------------------------------------------------- strategies
def _two(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map("{:02d}".format)


_DIGITS = "0123456789"
_HEX = "0123456789abcdef"
WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()] + ["\ufeff"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)

sent_at_near = st.builds(
    lambda y, m, d, sep, hh, mm, ss, frac, off, tail: f"{y}-{m}-{d}{sep}{hh}:{mm}:{ss}{frac}{off}{tail}",
    st.one_of(
        st.text(_DIGITS, min_size=4, max_size=4),
        st.sampled_from(["0000", "0001", "9999", "10000", "999", "1900", "2000", "2023", "2024", "2100", "2400"]),
    ),
    st.one_of(_two(0, 13), st.sampled_from(["02", "1", "001"])),
    st.one_of(_two(0, 32), st.sampled_from(["28", "29", "30", "31", "1"])),
    st.sampled_from(["T", "t", " ", "_", ""]),
    _two(0, 25),
    _two(0, 61),
    st.one_of(_two(0, 61), st.just("60")),
    st.one_of(
        st.just(""),
        st.text(_DIGITS, min_size=1, max_size=12).map(lambda f: "." + f),
        st.sampled_from([".", ",5"]),
    ),
    st.one_of(
        st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+14:00", "-14:00", "+23:59", "-23:59", "+24:00"]),
        st.sampled_from(["+0100", "+01", "+01:60", "UTC", "+1:00", "Zz"]),
        st.builds(lambda s, h, m: f"{s}{h}:{m}", st.sampled_from("+-"), _two(0, 24), _two(0, 60)),
    ),
    st.sampled_from(["", "", "", "\n", " ", "x", "\u2028"]),
)
sent_at_extreme = st.builds(
    lambda date, t, frac, off: f"{date}T{t}{frac}{off}",
    st.sampled_from(["0001-01-01", "0001-01-02", "9999-12-31", "9999-12-30", "2000-02-29", "1970-01-01"]),
    st.sampled_from(["00:00:00", "23:59:59", "12:00:00", "00:59:59"]),
    st.one_of(st.just(""), st.text(_DIGITS, min_size=1, max_size=20).map(lambda f: "." + f)),
    st.sampled_from(["Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+14:00", "-14:00", "+01:00", "-01:00"]),
)
traceparent_near = st.builds(
    lambda v, t, p, f, tail: f"{v}-{t}-{p}-{f}{tail}",
    st.one_of(st.text(_HEX, min_size=2, max_size=2), st.sampled_from(["00", "ff", "0A", "0"])),
    st.one_of(
        st.text(_HEX, min_size=32, max_size=32), st.just("0" * 32), st.text(_HEX.upper(), min_size=32, max_size=32)
    ),
    st.one_of(st.text(_HEX, min_size=16, max_size=16), st.just("0" * 16), st.text(_HEX, min_size=15, max_size=15)),
    st.text(_HEX, min_size=2, max_size=2),
    st.sampled_from(["", "", "\n", "-00", " "]),
)
text_near = st.one_of(
    st.text(st.sampled_from([*WHITESPACE, "a", "\u200b", "\x00"]), max_size=6),
    st.text(st.characters(codec=None), max_size=6),  # lone surrogates included (codec=None allows Cs)
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
)
id_near = st.one_of(
    st.sampled_from(["", " ", "\x00"]),
    st.text(st.sampled_from(["a", "é", "😀", "\x00", "\n"]), min_size=250, max_size=260),
    st.text(st.characters(codec=None), max_size=4),
)
NEAR: dict[str, st.SearchStrategy[Any]] = {
    "message_id": id_near,
    "conversation_id": id_near,
    "user_id": id_near,
    "text": text_near,
    "sent_at": st.one_of(sent_at_near, sent_at_extreme),
    "traceparent": traceparent_near,
}
VALID: dict[str, st.SearchStrategy[Any]] = {name: from_schema(CHAT_SCHEMA["properties"][name]) for name in PROPS}
VALID["sent_at"] = st.one_of(VALID["sent_at"], sent_at_extreme)
VALID["traceparent"] = st.one_of(VALID["traceparent"], st.none())
FIELD_MODES = ["valid"] * 16 + ["near", "near", "any", "absent"]


@st.composite
def documents(draw: st.DrawFn, modes: list[str] = FIELD_MODES) -> dict[str, Any]:
    """A chat message document: each field valid (from the schema), a near miss, any JSON value, or absent."""
    doc: dict[str, Any] = {}
    for name in PROPS:
        mode = draw(st.sampled_from(modes))
        if mode == "absent" or (mode == "valid" and name not in REQUIRED and draw(st.booleans())):
            continue
        strategy = {"valid": VALID[name], "near": NEAR[name], "any": json_values}[mode]
        doc[name] = draw(strategy)
    extras = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in PROPS), json_values, max_size=2))
    return {**extras, **doc} if draw(st.booleans()) else {**doc, **extras}


def _encode(doc: Any, how: str) -> bytes:
    if how == "orjson":
        with contextlib.suppress(orjson.JSONEncodeError):  # lone surrogates: orjson refuses, json does not
            return orjson.dumps(doc)
    return json.dumps(doc, ensure_ascii=how == "ascii").encode("utf-8", "surrogatepass")


def _append(raw: bytes, member: bytes) -> bytes:
    """``raw`` (an object) with one more member at the end."""
    return raw[:-1] + (b"," if raw != b"{}" else b"") + member + b"}"


WIRE_EDITS: dict[str, Any] = {
    "none": lambda raw: raw,
    "bom": lambda raw: b"\xef\xbb\xbf" + raw,
    "trailing whitespace": lambda raw: raw + b" \r\n\t",
    "trailing garbage": lambda raw: raw + b"x",
    "NaN": lambda raw: _append(raw, b'"x":NaN'),
    "1e400": lambda raw: _append(raw, b'"x":1e400'),
    "-1e400": lambda raw: _append(raw, b'"x":-1e400'),
    "tiny": lambda raw: _append(raw, b'"x":-0.0e-400'),
    "u64+1": lambda raw: _append(raw, b'"x":18446744073709551616'),
    "400 digits": lambda raw: _append(raw, b'"x":' + b"9" * 400),
    "308 digits": lambda raw: _append(raw, b'"x":' + b"9" * 308),
    "depth 1024": lambda raw: _append(raw, b'"x":' + b"[" * 1023 + b"]" * 1023),
    "depth 1025": lambda raw: _append(raw, b'"x":' + b"[" * 1024 + b"]" * 1024),
    "lone high surrogate": lambda raw: _append(raw, b'"x":"\\ud800"'),
    "lone low surrogate": lambda raw: _append(raw, b'"x":"\\udc00a"'),
    "escaped pair": lambda raw: _append(raw, b'"x":"\\ud83d\\ude00"'),
    "encoded surrogate": lambda raw: _append(raw, b'"x":"\xed\xa0\x80"'),
    "invalid utf-8": lambda raw: _append(raw, b'"x":"\xff"'),
    "NUL escape": lambda raw: _append(raw, b'"x":"\\u0000"'),
    "raw control char": lambda raw: _append(raw, b'"x":"\x01"'),
    "duplicate text last": lambda raw: _append(raw, b'"text":"dup"'),
    "duplicate text blank last": lambda raw: _append(raw, b'"text":"  "'),
    "duplicate sent_at last": lambda raw: _append(raw, b'"sent_at":"2026-11-30t10:00:00z"'),
    "duplicate first": lambda raw: b'{"text":"  ","sent_at":5,' + raw[1:] if raw != b"{}" else raw,
}


@st.composite
def wire_messages(draw: st.DrawFn) -> bytes:
    doc = draw(json_values) if draw(st.integers(0, 9)) == 0 else draw(documents())
    raw = _encode(doc, draw(st.sampled_from(["orjson", "ascii", "utf8"])))
    if raw.startswith(b"{") and raw.endswith(b"}") and draw(st.booleans()):
        raw = WIRE_EDITS[draw(st.sampled_from(sorted(WIRE_EDITS)))](raw)
    return raw


# ------------------------------------------------------------------------------------------- 1. fidelity
GOOD = {"message_id": "m", "conversation_id": "c", "user_id": "u", "text": "hi", "sent_at": "2026-01-01T00:00:00Z"}


def _raw(**changes: Any) -> bytes:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not _ABSENT}).encode("utf-8", "surrogatepass")


_ABSENT = object()

CASES: list[tuple[str, bytes, bool]] = [
    ("lower-case t and z", _raw(sent_at="2026-11-30t10:00:00z"), True),
    ("offset +14:00", _raw(sent_at="2026-11-30T10:00:00+14:00"), True),
    ("offset -00:00", _raw(sent_at="2026-11-30T10:00:00-00:00"), True),
    ("offset +23:59", _raw(sent_at="2026-11-30T10:00:00+23:59"), True),
    ("offset +24:00", _raw(sent_at="2026-11-30T10:00:00+24:00"), False),
    ("offset without colon", _raw(sent_at="2026-11-30T10:00:00+0100"), False),
    ("one fractional digit", _raw(sent_at="2026-11-30T10:00:00.1Z"), True),
    ("twelve fractional digits", _raw(sent_at="2026-11-30T10:00:00.123456789012Z"), True),
    ("empty fraction", _raw(sent_at="2026-11-30T10:00:00.Z"), False),
    ("comma fraction", _raw(sent_at="2026-11-30T10:00:00,5Z"), False),
    ("leap second", _raw(sent_at="2016-12-31T23:59:60Z"), False),
    ("year 0001", _raw(sent_at="0001-01-01T00:00:00Z"), True),
    ("year 0001 east of UTC", _raw(sent_at="0001-01-01T00:00:00+01:00"), True),
    ("year 9999 west of UTC", _raw(sent_at="9999-12-31T23:59:59.999999999-14:00"), True),
    ("year 0000", _raw(sent_at="0000-01-01T00:00:00Z"), False),
    ("five-digit year", _raw(sent_at="10000-01-01T00:00:00Z"), False),
    ("February 29 leap", _raw(sent_at="2000-02-29T00:00:00Z"), True),
    ("February 29 non-leap", _raw(sent_at="1900-02-29T00:00:00Z"), False),
    ("April 31", _raw(sent_at="2026-04-31T00:00:00Z"), False),
    ("space separator", _raw(sent_at="2026-11-30 10:00:00Z"), False),
    ("no seconds", _raw(sent_at="2026-11-30T10:00Z"), False),
    ("no zone", _raw(sent_at="2026-11-30T10:00:00"), False),
    ("trailing newline", _raw(sent_at="2026-11-30T10:00:00Z\n"), False),
    ("ISO week date", _raw(sent_at="2026-W48-1T10:00:00Z"), False),
    ("sent_at as number", _raw(sent_at=1764496800), False),
    ("256 emoji id", _raw(message_id="😀" * 256), True),
    ("257 emoji id", _raw(message_id="😀" * 257), False),
    ("256 code points, 512 UTF-16 units", _raw(user_id="\U0001f600" * 256), True),
    ("empty id", _raw(conversation_id=""), False),
    ("integer id", _raw(message_id=7), False),
    ("float id", _raw(message_id=7.0), False),
    ("boolean id", _raw(user_id=True), False),
    ("missing user_id", _raw(user_id=_ABSENT), False),
    ("traceparent null", _raw(traceparent=None), True),
    ("traceparent absent", _raw(), True),
    ("traceparent valid", _raw(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), True),
    (
        "traceparent version ff (pattern allows)",
        _raw(traceparent="ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        True,
    ),
    (
        "traceparent trailing newline",
        _raw(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n"),
        False,
    ),
    ("traceparent upper case", _raw(traceparent="00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), False),
    ("traceparent empty", _raw(traceparent=""), False),
    ("text NUL", _raw(text="\x00"), True),
    ("text non-BMP", _raw(text="\U0001f600"), True),
    ("text zero-width space", _raw(text="\u200b"), True),
    ("text whitespace", _raw(text=" \t\n\u3000"), False),
    ("text U+001F only (Python whitespace)", _raw(text="\x1f"), False),
    ("text U+0085 only (Python whitespace)", _raw(text="\x85"), False),
    ("text U+FEFF only (ECMA-262 whitespace)", _raw(text="\ufeff"), False),
    ("text empty", _raw(text=""), False),
    ("text lone surrogate escape", _raw(text="a\ud800"), False),
    ("extra fields", _raw(lang="en", n=[1, {"a": None}]), True),
    ("extra huge integer", _raw(n=2**80), True),
    ("duplicate key, last valid", b'{"text":"  ",' + _raw()[1:], True),
    ("duplicate key, last blank", _raw()[:-1] + b',"text":" "}', False),
    ("byte order mark", b"\xef\xbb\xbf" + _raw(), False),
    ("array", b"[1, 2]", False),
    ("not JSON", b"{not json", False),
]


@pytest.mark.parametrize(("case", "raw", "valid"), CASES, ids=[c[0] for c in CASES])
def test_named_cases_match_the_contract_and_the_worker(case: str, raw: bytes, valid: bool) -> None:
    assert oracle(raw) is valid, f"the oracle is wrong about {case}"
    assert worker_accepts(raw) is valid


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=wire_messages())
def test_worker_accepts_exactly_what_the_contract_accepts(raw: bytes) -> None:
    assert worker_accepts(raw) == oracle(raw), raw[:400]


def test_the_generator_makes_both_verdicts_often() -> None:
    """The property above is only as good as its inputs: both verdicts must be common."""
    verdicts: list[bool] = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=wire_messages())
    def collect(raw: bytes) -> None:
        verdicts.append(oracle(raw))

    collect()
    assert 0.15 < sum(verdicts) / len(verdicts) < 0.85, sum(verdicts)


def test_patterns_in_the_worker_are_the_schemas() -> None:
    props = CHAT_SCHEMA["properties"]
    assert props["text"]["pattern"] == NON_WHITESPACE_PATTERN
    assert props["sent_at"]["pattern"] == RFC3339_PATTERN
    assert props["traceparent"]["pattern"] == TRACEPARENT_PATTERN
    assert props["traceparent"]["minLength"] == props["traceparent"]["maxLength"] == 55


def test_whitespace_class_is_python_isspace_plus_ecma_feff() -> None:
    import re

    rx = re.compile(NON_WHITESPACE_PATTERN)
    blank = {chr(c) for c in range(0x110000) if not (0xD800 <= c <= 0xDFFF) and rx.fullmatch(chr(c)) is None}
    assert blank == {*WHITESPACE}
    # ECMA-262 \s is WhiteSpace (TAB, VT, FF, ZWNBSP, every Zs) and LineTerminator (LF, CR, LS, PS)
    import unicodedata

    zs = {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Zs"}
    assert {"\t", "\x0b", "\x0c", "\ufeff", "\n", "\r", "\u2028", "\u2029"} | zs <= blank


def test_date_grammar_matches_the_format_checker_on_every_calendar_edge() -> None:
    """Schema pattern, jsonschema's date-time format and the worker's parser agree on every year 0000-9999."""
    import re

    pattern = re.compile(RFC3339_PATTERN)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    disagreements = []
    for year in range(10000):
        for month, day in ((2, 28), (2, 29), (2, 30), (4, 30), (4, 31), (12, 31), (13, 1), (0, 1), (1, 0), (1, 32)):
            text = f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"
            expected = year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            try:
                parse_sent_at(text)
                parsed = True
            except ValueError:
                parsed = False
            verdicts = (pattern.search(text) is not None, checker.conforms(text, "date-time"), parsed)
            if verdicts != (expected,) * 3:
                disagreements.append((text, verdicts))
    assert disagreements == []


# ------------------------------------------------------------------------------------------- 2. totality
MODEL = ModelInfo(name="emotion-minilm", version="v", runtime="onnxruntime-1.31.1", precision="int8", device="cpu")
TIMINGS = EventTimings(decode=0.1, cache=0, queue_wait=1, tokenize=0.2, infer=3, postprocess=0.1, total=5)
LABELS = ["anger", "joy", "neutral"]


@st.composite
def accepted_messages(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    doc = draw(documents(modes=["valid"]))
    raw = _encode(doc, draw(st.sampled_from(["orjson", "ascii", "utf8"])))
    return raw, doc


@st.composite
def trace_headers(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    parent = draw(st.one_of(traceparent_near, st.just("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")))
    members = draw(st.lists(st.builds("k{}={}".format, st.integers(0, 99), st.text("abc123", min_size=1)), max_size=40))
    out = [("traceparent", parent.encode())] if draw(st.booleans()) else []
    if members:
        out.append(("tracestate", ",".join(members).encode()))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    message=accepted_messages(),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    scores=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    headers_in=trace_headers(),
)
def test_everything_built_from_an_accepted_message_encodes_and_validates(
    message: tuple[bytes, dict[str, Any]],
    partition: int,
    offset: int,
    scores: list[float],
    headers_in: list[tuple[str, bytes]],
) -> None:
    raw, doc = message
    assert oracle(raw), raw[:300]  # the generator makes accepted documents only
    msg = decode_chat_message(raw)
    source = SourceRef(topic="chat.messages.v1", partition=partition, offset=offset)

    inputs = event_inputs(msg, source)
    label = LABELS[max(range(3), key=scores.__getitem__)]
    event = EmotionEvent.build(
        inputs,
        label=label,
        scores=dict(zip(LABELS, scores, strict=True)),
        model=MODEL,
        cache=CacheInfo(hit=False, level="none"),
        truncated=False,
        timings_ms=TIMINGS,
        received_at=1_764_496_800.0,
        emitted_at=1_764_496_800.5,
    )
    out = orjson.loads(event.to_json())
    EVENT.validate(out)
    assert out["traceparent"] == doc.get("traceparent")
    assert (out["message_id"], out["conversation_id"], out["user_id"]) == (
        doc["message_id"],
        doc["conversation_id"],
        doc["user_id"],
    )
    # the same instant, whatever the rendering
    assert parse_sent_at(out["sent_at"]) == parse_sent_at(doc["sent_at"]).replace(
        microsecond=parse_sent_at(doc["sent_at"]).microsecond // 1000 * 1000
    )
    assert inputs.key == doc["conversation_id"].encode()

    trace = read_trace_context(headers_in, msg.traceparent)
    headers = EventHeaders(event_source(source.topic)).build(out["event_id"], out["emitted_at"], trace)
    assert all(isinstance(n, str) and isinstance(v, bytes) for n, v in headers)

    dead = DeadLetter.build(
        reason="output_failed",
        stage="output",
        error=RuntimeError(doc["text"]),
        source=source,
        raw_key=inputs.key,
        raw_value=raw,
        received_at=1_764_496_800.0,
        worker_id="worker-a",
    )
    DEAD.validate(orjson.loads(dead.to_json()))
    assert all(isinstance(v, bytes) for _, v in dead_letter_headers(dead, trace))

    ChatMessage.model_validate(orjson.loads(msg.to_json()))  # the message re-serialises to itself
    CHAT.validate(orjson.loads(msg.to_json()))


@pytest.mark.parametrize(
    ("sent_at", "rendered"),
    [
        ("2026-11-30t10:00:00z", "2026-11-30T10:00:00.000Z"),
        ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00.000+01:00"),
        ("0001-01-01T01:00:00+01:00", "0001-01-01T00:00:00.000Z"),
        ("9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59.000-14:00"),
        ("9999-12-31T09:59:59.9999999-14:00", "9999-12-31T23:59:59.999Z"),
        ("2026-01-01T00:00:00-00:00", "2026-01-01T00:00:00.000Z"),
        ("2024-02-29T12:00:00.1+05:30", "2024-02-29T06:30:00.100Z"),
    ],
)
def test_sent_at_is_rendered_in_utc_or_with_its_offset_at_the_edges(sent_at: str, rendered: str) -> None:
    msg = decode_chat_message(_raw(sent_at=sent_at))
    inputs = event_inputs(msg, SourceRef(topic="t", partition=0, offset=0))
    assert inputs.sent_at == rendered
    assert jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms(rendered, "date-time")


def test_a_lone_surrogate_in_a_dead_letter_is_replaced_not_fatal() -> None:
    dead = DeadLetter.build(
        reason="schema",
        stage="validate",
        error=ValueError("bad \ud800 value"),
        source=SourceRef(topic="t\udc00", partition=0, offset=0),
        raw_key=None,
        raw_value=b"{}",
        received_at=0.0,
        worker_id="w\ud800",
    )
    doc = orjson.loads(dead.to_json())
    DEAD.validate(doc)
    assert doc["error_message"] == "bad \ufffd value" and doc["worker_id"] == "w\ufffd"


def test_event_build_refuses_scores_outside_zero_one_with_a_value_error() -> None:
    msg = decode_chat_message(_raw())
    inputs = event_inputs(msg, SourceRef(topic="t", partition=0, offset=0))
    for scores in ({"joy": float("nan")}, {"joy": 1.5}, {"anger": 0.5}, {}):
        with pytest.raises(ValueError, match="scores"):
            EmotionEvent.build(
                inputs,
                label="joy",
                scores=scores,
                model=MODEL,
                cache=CacheInfo(hit=True, level="l1"),
                truncated=False,
                timings_ms=TIMINGS,
                received_at=0.0,
                emitted_at=0.0,
            )


# ------------------------------------------------------------------------------------------- 3. bounded
MB = 1_000_000
FULL_TRACE = TraceContext(
    "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01", ",".join(f"k{i}=" + "v" * 250 for i in range(32))
)


def _record_size(dead: DeadLetter) -> int:
    headers: list[tuple[str, bytes | None]] = list(dead_letter_headers(dead, FULL_TRACE))
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(dead.kafka_key, dead.to_json(), headers))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    key_size=st.one_of(st.none(), st.integers(0, 5 * MB), st.integers(MB, 5 * MB), st.sampled_from([0, 1024, 1025])),
    value_size=st.one_of(st.none(), st.integers(0, 5 * MB), st.integers(MB, 5 * MB), st.sampled_from([0, 11])),
    limit=st.one_of(
        st.sampled_from([MIN_MAX_RECORD_BYTES, 1_000_000, DEFAULT_MAX_RECORD_BYTES]),
        st.integers(MIN_MAX_RECORD_BYTES, 8 * MB),
    ),
    message=st.text(st.characters(codec=None), max_size=1500),
    worker_id=st.text(max_size=300),
    topic=st.text(max_size=300),
    max_raw_bytes=st.one_of(st.none(), st.integers(0, 3 * MB)),
)
@example(
    key_size=450_000, value_size=11, limit=1_000_000, message="not JSON", worker_id="w", topic="t", max_raw_bytes=None
)
def test_a_dead_letter_always_fits_the_producer_limit(
    key_size: int | None,
    value_size: int | None,
    limit: int,
    message: str,
    worker_id: str,
    topic: str,
    max_raw_bytes: int | None,
) -> None:
    raw_key = None if key_size is None else bytes(range(256)) * (key_size // 256) + b"k" * (key_size % 256)
    raw_value = None if value_size is None else b"\xfe" * value_size
    dead = DeadLetter.build(
        reason="undecodable",
        stage="decode",
        error=DecodeError('\x01"\\' + message),
        source=SourceRef(topic=topic, partition=3, offset=2**63 - 1),
        raw_key=raw_key,
        raw_value=raw_value,
        received_at=1.0,
        worker_id=worker_id,
        max_record_bytes=limit,
        max_raw_bytes=max_raw_bytes,
    )
    assert _record_size(dead) <= limit
    assert _record_size(dead.reduced()) <= limit
    doc = orjson.loads(dead.to_json())
    DEAD.validate(doc)
    # what is kept is a prefix of the original, flagged and sized honestly
    if raw_value is None:
        assert doc["raw_value_b64"] is None and doc["raw_size_bytes"] == 0
    else:
        kept = base64.b64decode(doc["raw_value_b64"])
        assert raw_value.startswith(kept) and doc["raw_size_bytes"] == len(raw_value)
        assert doc["raw_truncated"] == (len(kept) < len(raw_value))
    if raw_key is None:
        assert doc["raw_key_b64"] is None and doc["raw_key_size_bytes"] is None and dead.kafka_key is None
    else:
        kept = base64.b64decode(doc["raw_key_b64"])
        assert raw_key.startswith(kept) and doc["raw_key_size_bytes"] == len(raw_key)
        assert doc["raw_key_truncated"] == (len(kept) < len(raw_key))
        assert doc["key_hashed"] == (len(raw_key) > MAX_ORIGINAL_KEY_BYTES)
        assert dead.kafka_key == raw_key if not doc["key_hashed"] else len(dead.kafka_key or b"") == 71
    reduced = orjson.loads(dead.reduced().to_json())
    DEAD.validate(reduced)
    assert reduced["raw_omitted"] is True and reduced["raw_size_bytes"] == doc["raw_size_bytes"]


def test_the_swapped_key_and_value_of_issue_15_fits_and_keeps_what_it_can() -> None:
    key = json.dumps({"message_id": "m", "text": "x" * 450_000}).encode()  # a 450 KB document as the key
    dead = DeadLetter.build(
        reason="undecodable",
        stage="decode",
        error=DecodeError("not UTF-8 I-JSON"),
        source=SourceRef(topic="chat.messages.v1", partition=0, offset=7),
        raw_key=key,
        raw_value=b"conv-demo-3",
        received_at=1.0,
        worker_id="worker-a",
        max_record_bytes=1_000_000,  # faust's default producer_max_request_size
    )
    doc = orjson.loads(dead.to_json())
    assert _record_size(dead) <= 1_000_000
    assert dead.kafka_key is not None and dead.kafka_key.startswith(b"sha256:") and doc["key_hashed"]
    assert base64.b64decode(doc["raw_value_b64"]) == b"conv-demo-3" and not doc["raw_truncated"]
    assert base64.b64decode(doc["raw_key_b64"]) == key and not doc["raw_key_truncated"]  # 600 KB of base64 fits


def test_a_too_small_limit_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="max_record_bytes"):
        DeadLetter.build(
            reason="schema",
            stage="validate",
            error=SchemaError("x"),
            source=SourceRef(topic="t", partition=0, offset=0),
            raw_key=None,
            raw_value=b"",
            received_at=0.0,
            worker_id="w",
            max_record_bytes=MIN_MAX_RECORD_BYTES - 1,
        )
