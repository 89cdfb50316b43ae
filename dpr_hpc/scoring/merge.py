"""Merging each question's top-k over the shards of a sharded corpus.

Each shard is searched on its own (exact inner product by default), which gives every question
its k best passages *of that shard*. The corpus's top-k is the k best of the union: scores are
comparable across shards because every shard was encoded by the same passage tower, so a merge
by score is exact; it is what an unsharded exact search returns, up to ties and fp rounding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def merge_top_k(shard_scores: Sequence[np.ndarray], shard_ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) per question over all shards, best first.

    `shard_scores[s]` and `shard_ids[s]` are (questions, k_s) arrays from shard s (ids global to
    the corpus; -1 marks an empty slot, as FAISS writes when a shard holds fewer than k_s
    passages). Returns (questions, k) float32 scores and int64 ids; ties keep the lower id first,
    so the order is the same however the shards were cut."""
    if len(shard_scores) != len(shard_ids) or not shard_scores:
        raise ValueError("merge_top_k: one score array and one id array per shard, at least one shard")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s in shard_scores], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in shard_ids], axis=1)
    if scores.shape != ids.shape:
        raise ValueError(f"merge_top_k: scores {scores.shape} and ids {ids.shape} differ in shape")
    scores = np.where(ids < 0, -np.inf, scores)
    k = min(k, scores.shape[1])
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # last key first: by score descending, then by id ascending
    merged_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    merged_ids = np.take_along_axis(ids, order, axis=1)
    merged_ids[~np.isfinite(merged_scores)] = -1
    return merged_scores, merged_ids
