"""Tokenisation and padding, shared by every engine.

Texts are encoded once, on arrival, into :class:`Encoded` items (token ids, count, truncation flag) so the
batcher can group by length and count padded tokens before any batch exists. :meth:`TextEncoder.pad` turns
a group into the ``int64`` arrays an engine consumes, padded only to the longest item of that group.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_app.errors import ModelError

__all__ = ["Encoded", "EncodedBatch", "TextEncoder", "pad"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenised text.

    Attributes:
        input_ids: token ids including the special tokens, already truncated to the encoder's limit.
        n_tokens: ``len(input_ids)``; what the text costs in a batch before padding.
        truncated: the text had more tokens than the limit and was cut.
    """

    input_ids: tuple[int, ...]
    n_tokens: int
    truncated: bool


@dataclass(frozen=True, slots=True, eq=False)
class EncodedBatch:
    """A padded batch: ``(rows, seq_len)`` int64 arrays, right-padded with the pad id.

    Attributes:
        input_ids: token ids, pad id after each row's end.
        attention_mask: 1 for a real token, 0 for padding.
        token_type_ids: zeros, present only when the model takes them (BERT does).
        real_tokens: sum of the rows' token counts.
        padded_tokens: ``rows * seq_len``, what the engine actually computes.
    """

    input_ids: IntArray
    attention_mask: IntArray
    token_type_ids: IntArray | None
    real_tokens: int
    padded_tokens: int

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Padded sequence length (0 for an empty batch)."""
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.size

    def take(self, start: int, stop: int) -> EncodedBatch:
        """Rows ``start:stop`` as a batch of their own, re-trimmed to their longest row.

        Used to split a batch that ran out of device memory: the halves should not keep paying for the
        padding of a long row that went to the other half.
        """
        mask = self.attention_mask[start:stop]
        lengths = mask.sum(axis=1)
        width = int(lengths.max()) if lengths.size else 0
        ids = np.ascontiguousarray(self.input_ids[start:stop, :width])
        types = None if self.token_type_ids is None else np.ascontiguousarray(self.token_type_ids[start:stop, :width])
        return EncodedBatch(
            input_ids=ids,
            attention_mask=np.ascontiguousarray(mask[:, :width]),
            token_type_ids=types,
            real_tokens=int(lengths.sum()),
            padded_tokens=int(ids.shape[0] * width),
        )


def pad(
    items: Sequence[Encoded],
    *,
    pad_id: int = 0,
    with_token_type_ids: bool = True,
    pad_to_multiple_of: int | None = None,
) -> EncodedBatch:
    """Right-pad ``items`` to the longest one and return the batch arrays.

    Args:
        items: encoded texts, in the order their predictions must come back.
        pad_id: the tokenizer's pad token id.
        with_token_type_ids: also return an all-zero ``token_type_ids`` array (single-segment input).
        pad_to_multiple_of: round the width up to a multiple of this (GPU tensor cores like multiples
            of 8); ``None`` pads to the longest item only, which is best on a CPU.
    """
    rows = len(items)
    longest = max((item.n_tokens for item in items), default=0)
    width = longest
    if pad_to_multiple_of and width:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    real = 0
    for row, item in enumerate(items):
        n = item.n_tokens
        input_ids[row, :n] = item.input_ids
        attention_mask[row, :n] = 1
        real += n
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=np.zeros((rows, width), dtype=np.int64) if with_token_type_ids else None,
        real_tokens=real,
        padded_tokens=rows * width,
    )


class TextEncoder:
    """A Hugging Face fast (Rust) tokenizer with a fixed token limit.

    ``encode`` makes one batch call into the Rust tokenizer, which releases the GIL, so it may run in a
    worker thread beside the event loop. The instance is not reconfigured after construction, which is
    what makes sharing it between threads safe.
    """

    def __init__(
        self,
        backend: object,
        *,
        max_length: int,
        pad_id: int,
        with_token_type_ids: bool,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """Wrap an already loaded ``tokenizers.Tokenizer``; most callers want :meth:`from_pretrained`."""
        if max_length < 3:
            raise ModelError(f"max_length must leave room for special tokens, got {max_length}")
        self._backend = backend
        self.max_length = max_length
        self.pad_id = pad_id
        self.with_token_type_ids = with_token_type_ids
        self.pad_to_multiple_of = pad_to_multiple_of
        # Padding is ours (per batch, to its longest item); truncation is the tokenizer's, so the
        # special tokens survive the cut. Both are set once here, never per call.
        backend.no_padding()  # type: ignore[attr-defined]
        backend.enable_truncation(max_length)  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_length: int, *, pad_to_multiple_of: int | None = None
    ) -> TextEncoder:
        """Load the fast tokenizer of a model folder (or cached hub id; never downloads).

        A folder with ``tokenizer.json`` is read by the ``tokenizers`` package alone (about 30 ms, no
        transformers import: an ONNX worker starts without it), with ``tokenizer_config.json`` giving the
        pad token, the model's token limit and its inputs, as transformers' fast tokenizer would. Anything
        else (a hub id, a folder with only slow-tokenizer files) goes through ``transformers.AutoTokenizer``.

        Args:
            path: model folder with ``tokenizer.json`` (or files a fast tokenizer can be built from).
            max_length: token limit per text, special tokens included; capped at the model's own limit.
            pad_to_multiple_of: see :func:`pad`.

        Raises:
            ModelError: no fast tokenizer can be loaded from ``path``.
            EngineError: it needs transformers (no ``tokenizer.json``) and transformers is not installed.
        """
        folder = Path(path)
        if (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder, max_length, pad_to_multiple_of)
        return cls._from_transformers(path, max_length, pad_to_multiple_of)

    @classmethod
    def _from_tokenizer_json(cls, folder: Path, max_length: int, pad_to_multiple_of: int | None) -> TextEncoder:
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a plain Exception for a bad file
            raise ModelError(f"cannot load {folder / 'tokenizer.json'}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        _sync_bert_normalizer(backend, config)
        model_limit = config.get("model_max_length")
        # Some tokenizers report a huge sentinel when the limit is unknown; only a real limit caps ours.
        if isinstance(model_limit, int | float) and 0 < model_limit < 100_000:
            max_length = min(max_length, int(model_limit))
        pad_token = _token_text(config.get("pad_token", special.get("pad_token")))
        pad_id = backend.token_to_id(pad_token) if pad_token else None
        names = config.get("model_input_names")
        if isinstance(names, list):
            with_token_types = "token_type_ids" in names
        else:
            # transformers' default inputs include token types; the classes that drop them (RoBERTa,
            # DistilBERT, GPT-2...) belong to models without a segment embedding to feed them to.
            model_config = _read_json(folder / "config.json")
            with_token_types = int(model_config.get("type_vocab_size", 0) or 0) > 1
        return cls(
            backend,
            max_length=max_length,
            pad_id=int(pad_id) if pad_id is not None else 0,
            with_token_type_ids=with_token_types,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    @classmethod
    def _from_transformers(cls, path: str | Path, max_length: int, pad_to_multiple_of: int | None) -> TextEncoder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from stream_app.inference._optional import require

        transformers = require("transformers", f"loading a tokenizer without tokenizer.json ({path})")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from exc
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelError(f"{path} has no fast (Rust) tokenizer; batch encoding needs one")
        model_limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(model_limit, int) and 0 < model_limit < 100_000:
            max_length = min(max_length, model_limit)
        pad_id = tokenizer.pad_token_id
        return cls(
            backend,
            max_length=max_length,
            pad_id=int(pad_id) if pad_id is not None else 0,
            with_token_type_ids="token_type_ids" in tokenizer.model_input_names,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenise ``texts`` (one batch call into Rust), truncating each to ``max_length`` tokens."""
        if not texts:
            return []
        encodings = self._backend.encode_batch(list(texts))  # type: ignore[attr-defined]
        out: list[Encoded] = []
        for encoding in encodings:
            ids = tuple(encoding.ids)
            out.append(Encoded(input_ids=ids, n_tokens=len(ids), truncated=bool(encoding.overflowing)))
        return out

    def pad(self, items: Sequence[Encoded]) -> EncodedBatch:
        """Pad ``items`` into a batch with this tokenizer's pad id and model inputs."""
        return pad(
            items,
            pad_id=self.pad_id,
            with_token_type_ids=self.with_token_type_ids,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def __call__(self, texts: Sequence[str]) -> EncodedBatch:
        """Encode and pad in one go (parity samples, warm-up, benchmarks)."""
        return self.pad(self.encode(texts))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; ``{}`` when the file is absent.

    Raises:
        ModelError: the file exists but is not a JSON object.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def _token_text(token: object) -> str | None:
    """A special token as saved by transformers: a string or an ``AddedToken`` dict with ``content``."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return str(token["content"])
    return None


def _sync_bert_normalizer(backend: Any, config: dict[str, Any]) -> None:
    """Apply ``do_lower_case``/``strip_accents``/``tokenize_chinese_chars`` over a BERT normalizer.

    transformers' BERT-family fast tokenizers rebuild the normalizer when ``tokenizer_config.json``
    disagrees with ``tokenizer.json``; doing the same keeps the ids identical to what the model was
    trained with.
    """
    keys = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
    if not any(key in config for key in keys):
        return
    from tokenizers import normalizers

    normalizer = backend.normalizer
    if normalizer is None:
        return
    state = json.loads(normalizer.__getstate__())
    if not isinstance(state, dict) or state.get("type") != "BertNormalizer":
        return
    wanted = {
        "lowercase": config.get("do_lower_case", state.get("lowercase", True)),
        "strip_accents": config.get("strip_accents", state.get("strip_accents")),
        "handle_chinese_chars": config.get("tokenize_chinese_chars", state.get("handle_chinese_chars", True)),
    }
    if all(state.get(key) == value for key, value in wanted.items()):
        return
    backend.normalizer = normalizers.BertNormalizer(clean_text=bool(state.get("clean_text", True)), **wanted)
