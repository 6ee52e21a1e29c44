"""The compact L2 value: one classification result and its expiry, in 12 + 4n bytes.

Layout (little-endian, ``struct`` format ``<BBdBB`` then ``n`` x ``<f4``)::

    offset  size  field
    0       1     version (currently 1)
    1       1     flags: bit 0 = the text was truncated before inference
    2       8     expires_at, float64 Unix seconds (wall clock: the table outlives the process)
    10      1     n, number of scores (= number of labels)
    11      1     label_index, index of the predicted label (< n)
    12      4n    scores, float32

Scores are stored as float32 bit for bit, so an event built from a hit equals the event of the miss that
filled it, provided the miss path builds its event from the same :class:`CachedResult`. Not JSON: it is
about 3x smaller, and decoding is one ``struct.unpack_from`` plus a zero-copy ``numpy.frombuffer``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["CODEC_VERSION", "CachedResult", "decode", "encode"]

CODEC_VERSION = 1
_HEADER = struct.Struct("<BBdBB")
_FLAG_TRUNCATED = 0x01
_KNOWN_FLAGS = _FLAG_TRUNCATED
_F32 = np.dtype("<f4")


@dataclass(frozen=True, eq=False)
class CachedResult:
    """One cached classification.

    ``scores`` is converted to a read-only, contiguous float32 vector on construction: cached values are
    shared between lookups, so nobody may change one in place.

    Attributes:
        label_index: Index of the predicted label.
        scores: One score per label, float32.
        expires_at: Unix time (seconds) after which the entry is a miss.
        truncated: Whether the text was truncated to the model's token limit.
    """

    label_index: int
    scores: npt.NDArray[np.float32] = field(repr=False)
    expires_at: float
    truncated: bool = False

    def __post_init__(self) -> None:
        scores = np.array(self.scores, dtype=_F32, copy=None, order="C")
        if scores.ndim != 1 or not 1 <= scores.size <= 255:
            raise ValueError(f"scores must be a vector of 1 to 255 values, got shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("scores must be finite")
        if not 0 <= self.label_index < scores.size:
            raise ValueError(f"label_index {self.label_index} out of range for {scores.size} scores")
        if not math.isfinite(self.expires_at):
            raise ValueError(f"expires_at must be finite, got {self.expires_at}")
        if scores.flags.writeable:
            if scores is self.scores:
                scores = scores.copy()  # do not freeze the caller's array under them
            scores.flags.writeable = False
        object.__setattr__(self, "scores", scores)

    def is_expired(self, now: float) -> bool:
        """Whether the entry is stale at Unix time ``now``."""
        return now >= self.expires_at

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CachedResult):
            return NotImplemented
        return (
            self.label_index == other.label_index
            and self.expires_at == other.expires_at
            and self.truncated == other.truncated
            and self.scores.tobytes() == other.scores.tobytes()
        )


def encode(r: CachedResult) -> bytes:
    """Pack ``r`` into the versioned binary layout above."""
    flags = _FLAG_TRUNCATED if r.truncated else 0
    header = _HEADER.pack(CODEC_VERSION, flags, r.expires_at, r.scores.size, r.label_index)
    return header + r.scores.astype(_F32, copy=False).tobytes()


def decode(b: bytes, *, n_labels: int | None = None) -> CachedResult:
    """Unpack a value written by :func:`encode`.

    Args:
        b: The stored bytes.
        n_labels: When given, the number of scores the current model has; a value with another count
            (written for a different label set) is rejected.

    Raises:
        ValueError: Truncated or trailing bytes, another version, unknown flags, a score count other than
            ``n_labels``, an out-of-range label, or non-finite numbers.
    """
    if len(b) < _HEADER.size:
        raise ValueError(f"cached value too short: {len(b)} bytes")
    version, flags, expires_at, n, label_index = _HEADER.unpack_from(b)
    if version != CODEC_VERSION:
        raise ValueError(f"cached value version {version}, expected {CODEC_VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise ValueError(f"cached value has unknown flags {flags:#04x}")
    if len(b) != _HEADER.size + 4 * n:
        raise ValueError(f"cached value of {len(b)} bytes does not hold {n} scores")
    if n_labels is not None and n != n_labels:
        raise ValueError(f"cached value has {n} scores, the model has {n_labels} labels")
    scores = np.frombuffer(b, dtype=_F32, count=n, offset=_HEADER.size)
    # CachedResult validates the scores, label_index and expires_at, and keeps this read-only view of
    # `b` without copying.
    return CachedResult(
        label_index=label_index, scores=scores, expires_at=expires_at, truncated=bool(flags & _FLAG_TRUNCATED)
    )
