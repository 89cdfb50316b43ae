"""FAISS index construction and the timed per-query search that the paper's ITA measures."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from dpr_hpc.fsutil import FileDigest, write_file_atomic
from dpr_hpc.grid import IndexConfig


def build_index(config: IndexConfig, embeddings: np.ndarray) -> faiss.Index:
    """HNSW-Flat over inner product (efConstruction set before adding, as it must be), or exact."""
    dim = embeddings.shape[1]
    if config.type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    configure_search(index, config)
    return index


def configure_search(index: faiss.Index, config: IndexConfig) -> None:
    if config.type == "hnsw_flat":
        faiss.downcast_index(index).hnsw.efSearch = config.ef_search


def save_index(index: faiss.Index, path: Path) -> FileDigest:
    """Written whole or not at all (temporary file, fsync, rename); returns its size and hash."""
    return write_file_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))


def load_index(path: Path, config: IndexConfig) -> faiss.Index:
    index = faiss.read_index(str(path))
    configure_search(index, config)
    return index


@dataclass(frozen=True)
class SearchResult:
    """Top-k row ids (-1 where the index had fewer hits), their inner-product scores as FAISS
    gave them (kept for TREC run files), and each query's search time in ms."""

    ids: np.ndarray
    scores: np.ndarray
    times_ms: np.ndarray


def search_one_at_a_time(index: faiss.Index, queries: np.ndarray, k: int) -> SearchResult:
    """Every query searched alone and timed alone (encoding excluded): the paper's ITA."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    times_ms = np.empty(len(queries), dtype=np.float64)
    for row in range(len(queries)):
        query = queries[row : row + 1]
        start = time.perf_counter()
        found_scores, found = index.search(query, k)
        times_ms[row] = (time.perf_counter() - start) * 1000.0
        ids[row] = found[0]
        scores[row] = found_scores[0]
    return SearchResult(ids, scores, times_ms)
