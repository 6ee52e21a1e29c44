"""Cache keys: normalisation and model identity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.cache.keys import KEY_BYTES, ModelIdentity, cache_key, normalise

pytestmark = pytest.mark.unit

MODEL = ModelIdentity(name="minilm-ekman", version="abc123", runtime="onnx", precision="float32")


def test_nfc_makes_composed_and_decomposed_forms_equal() -> None:
    decomposed = "cafe\u0301"
    composed = "caf\u00e9"
    assert decomposed != composed
    assert normalise(decomposed) == normalise(composed) == composed
    assert cache_key(decomposed, MODEL) == cache_key(composed, MODEL)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  hello   world  ", "hello world"),
        ("tab\tand\nnewline\r\n here", "tab and newline here"),
        ("\u00a0non-breaking\u2003em space\u3000ideographic", "non-breaking em space ideographic"),
        ("already normal", "already normal"),
        ("   ", ""),
    ],
)
def test_whitespace_is_stripped_and_collapsed(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_case_and_punctuation_are_kept() -> None:
    assert normalise("I HATE this") != normalise("i hate this")
    assert cache_key("I HATE this", MODEL) != cache_key("i hate this", MODEL)
    assert cache_key("great!", MODEL) != cache_key("great", MODEL)


def test_whitespace_variants_share_a_key() -> None:
    assert cache_key("  so   happy\n", MODEL) == cache_key("so happy", MODEL)


@pytest.mark.parametrize(
    "other",
    [
        ModelIdentity("minilm-ekman", "abc124", "onnx", "float32"),
        ModelIdentity("minilm-ekman", "abc123", "torch", "float32"),
        ModelIdentity("minilm-ekman", "abc123", "onnx", "int8"),
        ModelIdentity("other-model", "abc123", "onnx", "float32"),
    ],
)
def test_a_different_model_gives_a_different_key(other: ModelIdentity) -> None:
    assert other.tag != MODEL.tag
    assert cache_key("I am so happy", other) != cache_key("I am so happy", MODEL)


def test_a_different_input_window_gives_a_different_key_and_the_same_tag() -> None:
    """A text's result depends on how many of its tokens the model reads; a changed limit must miss the
    results the shared L2 holds from the old one (events still report the model by its tag alone)."""
    w128 = ModelIdentity("minilm-ekman", "abc123", "onnx", "float32", max_length_tokens=128)
    w256 = ModelIdentity("minilm-ekman", "abc123", "onnx", "float32", max_length_tokens=256)
    text = "long " * 300
    assert len({cache_key(text, w128), cache_key(text, w256), cache_key(text, MODEL)}) == 3
    assert cache_key(text, w128) == cache_key(text, ModelIdentity("minilm-ekman", "abc123", "onnx", "float32", 128))
    assert w128.tag == w256.tag == MODEL.tag


def test_key_shape_and_determinism() -> None:
    key = cache_key("hello", MODEL)
    assert isinstance(key, bytes)
    assert len(key) == KEY_BYTES == 16
    assert cache_key("hello", ModelIdentity("minilm-ekman", "abc123", "onnx", "float32")) == key


def test_tag_is_readable_and_identity_validated() -> None:
    assert MODEL.tag == "minilm-ekman|abc123|onnx|float32"
    with pytest.raises(ValueError, match="version"):
        ModelIdentity("m", "", "onnx", "float32")
    with pytest.raises(ValueError, match="name"):
        ModelIdentity("a|b", "1", "onnx", "float32")  # would make tags ambiguous


def test_lone_surrogate_does_not_break_the_key() -> None:
    assert len(cache_key("broken \ud83d emoji", MODEL)) == KEY_BYTES


@settings(deadline=None)  # a shared, loaded CI box must not turn slowness into failures
@given(st.text())
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert once == once.strip()
    assert "  " not in once


@settings(deadline=None)  # a shared, loaded CI box must not turn slowness into failures
@given(st.text(min_size=1), st.text(min_size=1))
def test_distinct_normalised_texts_have_distinct_keys(a: str, b: str) -> None:
    assert (cache_key(a, MODEL) == cache_key(b, MODEL)) == (normalise(a) == normalise(b))
