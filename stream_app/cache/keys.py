"""Cache keys: normalised text hashed together with the identity of the model that scored it.

Two messages share a cached result when their texts are equal after :func:`normalise` and the same model
(name, version, runtime, precision) scored them with the same input window (``max_length_tokens``).
Case is kept on purpose: "I HATE this" and "i hate this" may carry different emotion, and the classifier
is cased-input (its tokenizer lower-cases or not; the cache must not decide that for it).
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from dataclasses import dataclass

__all__ = ["KEY_BYTES", "ModelIdentity", "cache_key", "normalise", "normalised_key"]

KEY_BYTES = 16
"""Length of a key: 128 bits makes an accidental collision negligible at any realistic cache size."""

_TAG_SEPARATOR = "|"


def normalise(text: str) -> str:
    """Unicode NFC, leading/trailing whitespace stripped, every whitespace run collapsed to one space.

    Case and punctuation are kept.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    # str.split() with no argument splits on runs of any Unicode whitespace and drops the ends.
    return " ".join(text.split())


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a cached result; any change must make every old key miss.

    Attributes:
        name: Model name, e.g. ``minilm-goemotions-ekman``.
        version: Version of the weights (checkpoint hash or release).
        runtime: Engine, e.g. ``torch``, ``onnx``, ``onnx-int8``.
        precision: Numeric precision, e.g. ``float32``, ``float16``.
        max_length_tokens: The tokens the model reads of a text (``model.max_length_tokens``); None leaves
            it out of the key. A longer text's result depends on it (truncated, or rejected), and the L2
            cache outlives restarts and is shared by the group, so a changed limit must not be answered
            with results computed under the old one.
    """

    name: str
    version: str
    runtime: str
    precision: str
    max_length_tokens: int | None = None

    def __post_init__(self) -> None:
        for field, value in (
            ("name", self.name),
            ("version", self.version),
            ("runtime", self.runtime),
            ("precision", self.precision),
        ):
            # The separator and NUL are refused so that the tag, and hence the key, is injective.
            if not value or _TAG_SEPARATOR in value or "\x00" in value:
                raise ValueError(f"ModelIdentity.{field} must be non-empty without '|' or NUL: {value!r}")

    @functools.cached_property
    def key_prefix(self) -> bytes:
        """``tag`` (then ``|max_length_tokens`` when set) ``+ "\\x00"`` in UTF-8: what every cache key of this
        model starts with before hashing. The fields hold no ``|``, so the prefix is injective."""
        window = "" if self.max_length_tokens is None else f"{_TAG_SEPARATOR}{self.max_length_tokens}"
        return f"{self.tag}{window}\x00".encode("utf-8", "surrogatepass")

    @property
    def tag(self) -> str:
        """``name|version|runtime|precision``; also what events report as the model."""
        return _TAG_SEPARATOR.join((self.name, self.version, self.runtime, self.precision))


def cache_key(text: str, model: ModelIdentity) -> bytes:
    """16-byte BLAKE2b of ``model.key_prefix + normalise(text)``.

    ``surrogatepass`` lets a JSON-decoded lone surrogate through instead of failing the lookup.
    """
    return normalised_key(normalise(text), model)


def normalised_key(text: str, model: ModelIdentity) -> bytes:
    """:func:`cache_key` of a text that is already :func:`normalise`-d (the intake's hot path)."""
    h = hashlib.blake2b(model.key_prefix, digest_size=KEY_BYTES)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()
