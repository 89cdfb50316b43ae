"""FAISS index construction and the timed per-query search that the paper's ITA measures."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from dpr_hpc.fsutil import FileDigest, write_file_atomic
from dpr_hpc.grid import IndexConfig



def build_index(config: IndexConfig, embeddings: np.ndarray) -> faiss.Index:
    """HNSW-Flat over inner product (efConstruction set before adding, as it must be), or exact."""
    index = _empty_index(config, embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    configure_search(index, config)
    return index


@dataclass(frozen=True)
class BuiltIndex:
    index: faiss.Index
    add_s: float  # the FAISS add calls only: reading the chunks from disk is not the index build
    add_calls: int = 0


def build_index_from_file(config: IndexConfig, path: Path) -> BuiltIndex:
    """The index over the float32 rows of a .npy file, added `config.add_batch_size` rows a call
    in row order (8,192 by default; the paper's datasets.add_faiss_index added 1,000).

    The index stage then never holds every embedding next to FAISS's own copy of them (24 MiB
    a call at 768-d fp32).
    At NQ's pool an HNSW index with M=512 is ~6 GiB, 2.5 GiB of it FAISS's copy of the
    vectors; building from one in-memory array held a second 2.5 GiB copy through the build.
    Chunks are read with plain reads, not a memory map, whose pages would count in the job's
    RSS. FAISS's HNSW inserts each add call's points highest level first, so the graph is not
    byte-identical to one add call's (it is not across thread counts either), and the add batch
    size is part of the index's identity.
    """
    chunk_rows = config.add_batch_size
    with Path(path).open("rb") as handle:
        rows, dim = _float32_matrix_header(handle, path)
        index = _empty_index(config, dim)
        add_s, calls = 0.0, 0
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            chunk = np.fromfile(handle, dtype=np.float32, count=count * dim).reshape(count, dim)
            began = time.perf_counter()
            index.add(chunk)
            add_s += time.perf_counter() - began
            calls += 1
    configure_search(index, config)
    return BuiltIndex(index, add_s, calls)


def _float32_matrix_header(handle, path: Path) -> tuple[int, int]:
    """(rows, dim) of a C-order float32 .npy matrix, the file positioned at its first row."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if len(shape) != 2 or fortran_order or dtype != np.dtype("<f4"):
        raise ValueError(f"{path}: expected a C-order float32 matrix, got shape {shape}, dtype {dtype}, fortran order {fortran_order}")
    return shape


def _empty_index(config: IndexConfig, dim: int) -> faiss.Index:
    if config.type == "flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
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


def search_one_at_a_time(index: faiss.Index, queries: np.ndarray, k: int,
                         fetch: Callable[[np.ndarray], object] | None = None) -> SearchResult:
    """Every query searched alone and timed alone (encoding excluded): the paper's ITA.

    `fetch(row ids)`, when given, runs inside each query's timer after its search: reading the
    result rows, as the paper's `get_nearest_examples` did (`timing.ita_includes_fetch`)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    times_ms = np.empty(len(queries), dtype=np.float64)
    for row in range(len(queries)):
        query = queries[row : row + 1]
        start = time.perf_counter()
        found_scores, found = index.search(query, k)
        if fetch is not None:
            fetch(found[0])
        times_ms[row] = (time.perf_counter() - start) * 1000.0
        ids[row] = found[0]
        scores[row] = found_scores[0]
    return SearchResult(ids, scores, times_ms)


def shard_index(vectors: np.ndarray, kind: str, config: IndexConfig) -> faiss.Index:
    """One corpus shard's index over its vectors (fp16 on disk are widened here: FAISS's flat
    and HNSW indexes hold float32): exact IndexFlatIP, or HNSW-Flat with the cell's settings,
    added `config.add_batch_size` rows a call as the index stage adds them."""
    config = dataclasses.replace(config, type="flat" if kind == "flat" else "hnsw_flat")
    index = _empty_index(config, int(vectors.shape[1]))
    for start in range(0, len(vectors), config.add_batch_size):
        index.add(np.ascontiguousarray(vectors[start : start + config.add_batch_size], dtype=np.float32))
    configure_search(index, config)
    return index


def search_batch(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every query at once (a corpus shard's throughput, not the paper's per-query ITA):
    (scores, row ids), row id -1 where the index holds fewer than k rows."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores.astype(np.float32), rows.astype(np.int64)


def exact_search_streamed(vectors_file: Path, queries: np.ndarray, k: int, chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over a shard's .npy vectors (fp32 or fp16), read a
    block of rows at a time: the task holds one block and the running top-k, never the shard's
    vectors (nor FAISS's copy of them), so a shard's search needs a fraction of its vectors' size
    in memory. The same ids and scores as one IndexFlatIP over the whole shard: each block's top-k
    holds every row that can be in the shard's, and `merge_top_k` keeps the k best (ties by the
    lower row). Reads with plain file reads, not a memory map, whose touched pages would count
    towards the task's resident memory. (scores, row ids), row id -1 past the shard's rows."""
    from dpr_hpc.scoring.merge import merge_top_k

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), 0), -1, dtype=np.int64)
    with open(vectors_file, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if fortran or len(shape) != 2:
            raise ValueError(f"{vectors_file}: expected a C-ordered (rows, dim) array, got shape {shape}")
        rows, dim = shape
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            block = np.fromfile(handle, dtype=dtype, count=count * dim).reshape(count, dim).astype(np.float32, copy=False)
            scores, found = faiss.knn(queries, np.ascontiguousarray(block), min(k, count), metric=faiss.METRIC_INNER_PRODUCT)
            del block
            best_scores, best_rows = merge_top_k([best_scores, scores], [best_rows, np.where(found >= 0, found + start, -1)], k)
    if best_scores.shape[1] < k:  # fewer rows than k: pad as FAISS does
        pad = k - best_scores.shape[1]
        best_scores = np.concatenate([best_scores, np.full((len(queries), pad), -np.inf, dtype=np.float32)], axis=1)
        best_rows = np.concatenate([best_rows, np.full((len(queries), pad), -1, dtype=np.int64)], axis=1)
    return best_scores.astype(np.float32), best_rows.astype(np.int64)
