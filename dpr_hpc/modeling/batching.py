"""Tokenization and batching. Inputs are tokenized once, unpadded; each batch is padded only to
its own longest sequence, which on NQ-like lengths is far below the 256 the paper pads to."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dpr_hpc.data import Passage

Features = list[dict[str, list[int]]]


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int) -> Features:
    encoded = tokenizer(list(questions), truncation=True, max_length=max_length)
    return _split(encoded)


def tokenize_passages(tokenizer, passages: Sequence[Passage], max_length: int, embed_title: bool) -> Features:
    """Title and text as a sentence pair, as DPR encodes them; text alone without titles."""
    texts = [p.text for p in passages]
    if embed_title:
        encoded = tokenizer([p.title for p in passages], texts, truncation="only_second", max_length=max_length)
    else:
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return _split(encoded)


def _split(encoded) -> Features:
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]


def pad_batch(features: Features, pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), longest), pad_id, dtype=torch.long)}
    batch["attention_mask"] = torch.zeros((len(features), longest), dtype=torch.long)
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(feature["input_ids"])
        batch["attention_mask"][row, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :n] = torch.tensor(feature["token_type_ids"])
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def encode(encoder, features: Features, pad_id: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Embeddings of `features` in input order, as float32 rows."""
    encoder.eval()
    out = np.empty((len(features), encoder.embedding_size), dtype=np.float32)
    for start in range(0, len(features), batch_size):
        batch = to_device(pad_batch(features[start : start + batch_size], pad_id), device)
        out[start : start + batch_size] = encoder(**batch).float().cpu().numpy()
    return out
