"""The index stage builds FAISS from its embeddings on disk, a chunk at a time, so it never
holds every vector next to FAISS's own copy: the index must be the one a single add gives."""

from __future__ import annotations

import numpy as np
import pytest

from dpr_hpc.fsutil import save_array
from dpr_hpc.grid.config import IndexConfig
from dpr_hpc.modeling.searcher import build_index, build_index_from_file


def vectors(rows: int = 5000, dim: int = 24) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, dim)).astype(np.float32)


def test_an_exact_index_built_in_chunks_from_a_file_equals_one_built_at_once(tmp_path):
    embeddings = vectors()
    save_array(tmp_path / "e.npy", embeddings)
    flat = IndexConfig(type="flat", add_batch_size=777)  # not a divisor: a short last chunk
    built = build_index_from_file(flat, tmp_path / "e.npy")
    assert built.index.ntotal == len(embeddings) and built.add_calls == 7  # ceil(5000 / 777)
    reference = build_index(flat, embeddings)
    queries = embeddings[:40] + 0.01
    assert np.array_equal(built.index.search(queries, 10)[1], reference.search(queries, 10)[1])
    assert built.add_s > 0


def test_an_hnsw_index_built_in_chunks_keeps_row_order_and_its_search_settings(tmp_path):
    embeddings = vectors(3000)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)  # unit rows: each is its own best match
    save_array(tmp_path / "e.npy", embeddings)
    config = IndexConfig(type="hnsw_flat", hnsw_m=16, ef_construction=64, ef_search=77, add_batch_size=1000)  # the paper's datasets'
    index = build_index_from_file(config, tmp_path / "e.npy").index
    assert index.ntotal == 3000 and index.hnsw.efSearch == 77 and index.hnsw.efConstruction == 64
    # Each row finds itself first: FAISS ids are the file's row numbers, whatever the chunking.
    ids = index.search(embeddings[::100], 1)[1][:, 0]
    assert np.array_equal(ids, np.arange(0, 3000, 100))


@pytest.mark.parametrize("array", [np.zeros((4, 3), dtype=np.float64), np.zeros(12, dtype=np.float32),
                                   np.asfortranarray(np.zeros((4, 3), dtype=np.float32))])
def test_a_file_that_is_not_a_float32_matrix_is_refused_by_name(tmp_path, array):
    save_array(tmp_path / "e.npy", array)
    with pytest.raises(ValueError, match="e.npy: expected a C-order float32 matrix"):
        build_index_from_file(IndexConfig(type="flat"), tmp_path / "e.npy")
