"""TextEncoder and pad: ids, masks, truncation flags, batch accounting."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.errors import ModelError
from stream_app.inference.tokenize import Encoded, TextEncoder, pad

pytestmark = pytest.mark.unit

CLS, SEP = 101, 102
_REPO = Path(__file__).resolve().parents[3]


def test_encode_adds_special_tokens_and_counts(encoder: TextEncoder) -> None:
    (item,) = encoder.encode(["hello world"])
    assert item.input_ids[0] == CLS and item.input_ids[-1] == SEP
    assert item.n_tokens == len(item.input_ids) == 4
    assert item.truncated is False


def test_long_text_is_truncated_and_flagged(tiny_model: Path) -> None:
    encoder = TextEncoder.from_pretrained(tiny_model, 8)
    long_item, exact, short = encoder.encode(["one two three four five six seven eight nine ten", "a b c d e f", "hi"])
    assert long_item.truncated and long_item.n_tokens == 8
    assert long_item.input_ids[-1] == SEP, "truncation must keep the closing special token"
    assert exact.n_tokens == 8 and not exact.truncated, "exactly at the limit is not truncated"
    assert short.n_tokens == 3 and not short.truncated


def test_max_length_is_capped_by_the_model_limit(tiny_model: Path) -> None:
    encoder = TextEncoder.from_pretrained(tiny_model, 100_000)
    assert encoder.max_length == 512  # the MiniLM tokenizer's model_max_length


def test_pad_to_longest_with_mask_and_token_types(encoder: TextEncoder) -> None:
    items = encoder.encode(["hi", "a much longer message than the first one", "ok then"])
    batch = encoder.pad(items)
    longest = max(i.n_tokens for i in items)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, longest)
    assert batch.input_ids.dtype == np.int64 and batch.attention_mask.dtype == np.int64
    assert batch.token_type_ids is not None and not batch.token_type_ids.any()
    for row, item in enumerate(items):
        assert tuple(batch.input_ids[row, : item.n_tokens]) == item.input_ids
        assert (batch.input_ids[row, item.n_tokens :] == encoder.pad_id).all()
        assert batch.attention_mask[row].sum() == item.n_tokens
    assert batch.real_tokens == sum(i.n_tokens for i in items)
    assert batch.padded_tokens == 3 * longest
    assert batch.size == len(batch) == 3 and batch.seq_len == longest


def test_pad_to_multiple_of_rounds_width_up() -> None:
    items = [Encoded((CLS, 5, 6, SEP), 4, False), Encoded((CLS, 7, 8, 9, 10, SEP), 6, False)]
    batch = pad(items, pad_to_multiple_of=8, with_token_type_ids=False)
    assert batch.seq_len == 8 and batch.token_type_ids is None
    assert batch.real_tokens == 10 and batch.padded_tokens == 16


def test_empty_inputs(encoder: TextEncoder) -> None:
    assert encoder.encode([]) == []
    batch = encoder.pad([])
    assert batch.size == 0 and batch.seq_len == 0 and batch.real_tokens == batch.padded_tokens == 0


def test_take_retrims_to_the_rows_kept(encoder: TextEncoder) -> None:
    items = encoder.encode(["a very long message with many many many words in it", "hi", "yo"])
    batch = encoder.pad(items)
    tail = batch.take(1, 3)
    assert tail.size == 2 and tail.seq_len == 3  # [CLS] word [SEP]
    assert (tail.input_ids == batch.input_ids[1:3, :3]).all()
    assert tail.real_tokens == items[1].n_tokens + items[2].n_tokens
    assert tail.padded_tokens == 6


def test_encode_from_worker_threads_matches(encoder: TextEncoder) -> None:
    texts = [f"message number {i} with {'words ' * (i % 7)}" for i in range(64)]
    expected = encoder.encode(texts)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(encoder.encode, [texts] * 4))
    assert all(result == expected for result in results)


_VARIED = (
    "Hello World!",
    "Ça c'est génial, naïve café",
    "东京 is 很好 and Ελληνικά too",
    "emoji 😀🔥 and tabs\tand\nnewlines",
    "   ",
    "[CLS] literal special tokens [SEP] [PAD]",
    "word " * 200,
)


def test_tokenizer_json_alone_matches_transformers(tiny_model: Path) -> None:
    """The tokenizers-only load (what an ONNX worker uses) gives transformers' ids, limits and inputs."""
    fast = TextEncoder._from_tokenizer_json(tiny_model, 64, None)
    reference = TextEncoder._from_transformers(tiny_model, 64, None)
    assert fast.encode(_VARIED) == reference.encode(_VARIED)
    assert (fast.max_length, fast.pad_id, fast.with_token_type_ids) == (
        reference.max_length,
        reference.pad_id,
        reference.with_token_type_ids,
    )


def test_tokenizer_config_overrides_the_normalizer_as_transformers_does(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cased"
    folder.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json", "vocab.txt"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    config.update({"do_lower_case": False, "strip_accents": False, "model_max_length": 40})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fast = TextEncoder._from_tokenizer_json(folder, 64, None)
    reference = TextEncoder._from_transformers(folder, 64, None)
    assert fast.encode(_VARIED) == reference.encode(_VARIED)
    assert fast.max_length == reference.max_length == 40
    assert fast.encode(["Hello"]) != TextEncoder.from_pretrained(tiny_model, 64).encode(["Hello"]), "case kept"


def test_loading_from_tokenizer_json_does_not_import_transformers(tiny_model: Path) -> None:
    code = (
        "import sys\n"
        "from stream_app.inference.tokenize import TextEncoder\n"
        f"TextEncoder.from_pretrained({str(tiny_model)!r}, 32).encode(['hi'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=_REPO
    )
    assert out.stdout.strip() == "[]"


def test_missing_tokenizer_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        TextEncoder.from_pretrained(tmp_path, 16)


_ids = st.lists(st.integers(min_value=1, max_value=30_000), min_size=1, max_size=20)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(_ids, min_size=1, max_size=12), pad_id=st.integers(min_value=0, max_value=3))
def test_pad_round_trips_every_row(rows: list[list[int]], pad_id: int) -> None:
    items = [Encoded(tuple(r), len(r), False) for r in rows]
    batch = pad(items, pad_id=pad_id)
    for row, item in enumerate(items):
        mask = batch.attention_mask[row].astype(bool)
        assert tuple(batch.input_ids[row][mask]) == item.input_ids
        assert (batch.input_ids[row][~mask] == pad_id).all()
    halves = [batch.take(0, len(items) // 2), batch.take(len(items) // 2, len(items))]
    assert sum(h.real_tokens for h in halves) == batch.real_tokens
    assert all(
        h.seq_len == max((i.n_tokens for i in part), default=0)
        for h, part in zip(halves, (items[: len(items) // 2], items[len(items) // 2 :]), strict=True)
    )
