"""Tokenized texts and the batches made of them.

Texts are tokenized once, unpadded, into flat arrays (ids, token types, offsets): a million
passages are a few hundred MB there instead of gigabytes of Python lists, and they load from the
token cache in a second. Each batch is padded only to its own longest sequence, rounded up to a
multiple of 8 for the tensor cores; the paper padded everything to 256 tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dpr_hpc.inputs.data import Passage

# Texts per tokenizer call: bounds the texts, encodings and token lists alive at once. Measured on
# 100-word passages: 8,192 a call raised peak RSS by 381 MB, 1,024 by 75 MB, at the same speed.
TOKENIZE_CHUNK = 1024
TokenRow = tuple[np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class TokenizedTexts:
    ids: np.ndarray  # int32, every sequence concatenated
    types: np.ndarray | None  # int8 token type ids, or None where the tokenizer has none
    offsets: np.ndarray  # int64, sequence i is ids[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> TokenRow:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], None if self.types is None else self.types[start:end]

    def save(self, path: Path) -> None:
        arrays = {"ids": self.ids, "offsets": self.offsets}
        if self.types is not None:
            arrays["types"] = self.types
        with path.open("wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> "TokenizedTexts":
        """Raises ValueError when the arrays do not fit together (a damaged file)."""
        with np.load(path) as saved:
            texts = cls(saved["ids"], saved["types"] if "types" in saved else None, saved["offsets"])
        offsets = texts.offsets
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(texts.ids) or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets do not index the token ids")
        if texts.types is not None and texts.types.shape != texts.ids.shape:
            raise ValueError("token types and ids differ in length")
        return texts


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int) -> TokenizedTexts:
    return _tokenize(tokenizer, questions, max_length, list)


def tokenize_passages(tokenizer, passages: Sequence[Passage], max_length: int, embed_title: bool,
                      passage_format: str = "paper") -> TokenizedTexts:
    """A passage's tokens in the grid's `text.passage_format` (README, *Fidelity*).

    paper: `title + " " + text` as one segment, exactly as the paper's code built it.
    dpr: `[CLS] title [SEP] text [SEP]` with every segment id 0, as DPR's training fed its
        encoders (it zeroes the segment ids of every batch), truncated as DPR's `truncation=True`
        (longest first); a passage with an empty title is its text alone, as in DPR.
    Without titles (`embed_title: false`) both are the text alone.
    """
    if passage_format == "paper":
        return _tokenize(tokenizer, passages, max_length, lambda chunk: [f"{p.title} {p.text}" if embed_title else p.text for p in chunk])
    if passage_format == "dpr":
        return _tokenize(tokenizer, passages, max_length,
                         lambda chunk: [(p.title, p.text) if embed_title and p.title else p.text for p in chunk], zero_segments=True)
    raise ValueError(f"unknown passage format {passage_format!r}")


def _tokenize(tokenizer, items: Sequence, max_length: int, inputs_of: Callable[[Sequence], list[str | tuple[str, str]]],
              zero_segments: bool = False) -> TokenizedTexts:
    """Texts (or title/text pairs, made of `items` by `inputs_of`) to flat token arrays, a chunk
    at a time: only one chunk's texts and token lists are Python objects at once (the items
    may be a prepared pool that reads its texts from a mapped file). `zero_segments` sets every
    token type id to 0."""
    ids: list[np.ndarray] = []
    types: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(items), TOKENIZE_CHUNK):
        encoded = tokenizer(inputs_of(items[start : start + TOKENIZE_CHUNK]), truncation=True, max_length=max_length)
        rows = encoded["input_ids"]
        chunk_lengths = [len(row) for row in rows]
        total = sum(chunk_lengths)
        lengths.extend(chunk_lengths)
        ids.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total))
        if "token_type_ids" in encoded:
            chunk_types = (np.zeros(total, dtype=np.int8) if zero_segments else
                           np.fromiter(itertools.chain.from_iterable(encoded["token_type_ids"]), dtype=np.int8, count=total))
            types.append(chunk_types)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    flat_types = np.concatenate(types) if types else None
    return TokenizedTexts(flat, flat_types, offsets)


def padded_width(longest: int, multiple: int = 1, pad_to: int | None = None) -> int:
    """The width `pad_batch` gives a batch whose longest sequence has `longest` tokens."""
    return pad_to if pad_to is not None else -(-longest // multiple) * multiple


def pad_batch(sequences: Sequence[TokenRow], pad_id: int, multiple: int = 1, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """A batch padded to its longest sequence rounded up to `multiple`, or to `pad_to` tokens."""
    width = padded_width(max(len(ids) for ids, _ in sequences), multiple, pad_to)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    with_types = sequences[0][1] is not None
    token_types = np.zeros((len(sequences), width), dtype=np.int64) if with_types else None
    for row, (ids, types) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = ids
        mask[row, :n] = 1
        if token_types is not None:
            token_types[row, :n] = types
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if token_types is not None:
        batch["token_type_ids"] = torch.from_numpy(token_types)
    return batch


def rows_of(texts: TokenizedTexts, rows: Sequence[int] | np.ndarray) -> list[TokenRow]:
    return [texts.sequence(int(i)) for i in rows]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
