"""L2 value codec: bit-exact round trip and rejection of garbage."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.cache.codec import CODEC_VERSION, CachedResult, decode, encode

pytestmark = pytest.mark.unit

N_LABELS = 7


def result(truncated: bool = False) -> CachedResult:
    scores = np.array([0.01, 0.02, 0.03, 0.8, 0.1, 0.02, 0.02], dtype=np.float32)
    return CachedResult(label_index=3, scores=scores, expires_at=1_767_225_600.25, truncated=truncated)


@pytest.mark.parametrize("truncated", [False, True])
def test_round_trip(truncated: bool) -> None:
    r = result(truncated)
    blob = encode(r)
    assert len(blob) == 12 + 4 * N_LABELS
    back = decode(blob, n_labels=N_LABELS)
    assert back == r
    assert back.truncated is truncated
    assert back.scores.dtype == np.float32
    assert back.scores.tobytes() == r.scores.tobytes()


@settings(deadline=None)  # a shared, loaded CI box must not turn slowness into failures
@given(
    scores=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=32),
    expires_at=st.floats(allow_nan=False, allow_infinity=False),
    truncated=st.booleans(),
    data=st.data(),
)
def test_round_trip_is_bit_exact(scores: list[float], expires_at: float, truncated: bool, data: st.DataObject) -> None:
    label = data.draw(st.integers(0, len(scores) - 1))
    r = CachedResult(label, np.array(scores, dtype=np.float32), expires_at, truncated)
    back = decode(encode(r))
    assert back.scores.tobytes() == np.array(scores, dtype=np.float32).tobytes()
    assert (back.label_index, back.expires_at, back.truncated) == (label, expires_at, truncated)


def test_json_is_not_used() -> None:
    assert not encode(result()).lstrip().startswith((b"{", b"["))
    assert encode(result())[0] == CODEC_VERSION


def test_scores_are_read_only_and_the_callers_array_is_untouched() -> None:
    mine = np.array([0.5, 0.5], dtype=np.float32)
    r = CachedResult(0, mine, 1.0)
    assert mine.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        r.scores[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        decode(encode(r)).scores[0] = 1.0


def test_float64_scores_are_stored_as_float32() -> None:
    r = CachedResult(0, np.array([0.1, 0.9]), 1.0)
    assert r.scores.dtype == np.float32
    assert decode(encode(r)) == r


def test_expiry() -> None:
    r = result()
    assert not r.is_expired(r.expires_at - 0.001)
    assert r.is_expired(r.expires_at)


def _header(version: int = CODEC_VERSION, flags: int = 0, n: int = 2, label: int = 0) -> bytes:
    return struct.pack("<BBdBB", version, flags, 100.0, n, label)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "too short"),
        (b"\x01\x00garbage", "too short"),
        (b'{"label": "joy", "scores": [0.1]}', "version"),
        (_header(version=2) + b"\x00" * 8, "version"),
        (_header(flags=0x80) + b"\x00" * 8, "flags"),
        (_header(n=2) + b"\x00" * 4, "does not hold"),
        (_header(n=2) + b"\x00" * 12, "does not hold"),
        (_header(n=2, label=2) + b"\x00" * 8, "label_index"),
        (_header(n=2) + struct.pack("<ff", float("nan"), 0.5), "finite"),
        (struct.pack("<BBdBB", 1, 0, float("inf"), 1, 0) + b"\x00" * 4, "finite"),
    ],
)
def test_garbage_is_rejected(blob: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode(blob)


def test_label_count_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        decode(encode(result()), n_labels=N_LABELS + 1)


@settings(deadline=None)  # a shared, loaded CI box must not turn slowness into failures
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_value_error(blob: bytes) -> None:
    try:
        r = decode(blob)
    except ValueError:
        return
    assert encode(r) == blob


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_index": 7, "scores": np.zeros(7, np.float32)},
        {"label_index": -1, "scores": np.zeros(7, np.float32)},
        {"label_index": 0, "scores": np.zeros((2, 2), np.float32)},
        {"label_index": 0, "scores": np.zeros(0, np.float32)},
        {"label_index": 0, "scores": np.zeros(256, np.float32)},
    ],
)
def test_invalid_results_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"scores|label_index"):
        CachedResult(expires_at=1.0, **kwargs)  # type: ignore[arg-type]
