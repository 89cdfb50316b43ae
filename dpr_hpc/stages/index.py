"""Index stage: encode the evaluation passage pool and build the FAISS index (the paper's PEI).

Embeddings go to disk in shards as they are encoded; a job stopped by its time limit or
preemption is requeued and goes on from the last finished shard, and its PEI adds up the
encoding time of every shard, whichever job wrote it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dpr_hpc.fsutil import save_array, write_file_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.modeling.batching import tokenize_passages
from dpr_hpc.modeling.encoding import encode
from dpr_hpc.modeling.precision import resolve_precision
from dpr_hpc.modeling.searcher import build_index, save_index
from dpr_hpc.prepared import load_dev
from dpr_hpc.stages.common import StageIO, StageOutput, load_trained_tower, peak_memory, pick_device, prepared_details, progress, tokenized


def index(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    device = pick_device()
    precision = resolve_precision(cell.precision.encode, device)
    encoder, tokenizer = load_trained_tower(cell, io, "passage", device)
    dev_file = cell.data_path("dev")
    dev = load_dev(dev_file, io.prepared_cache)
    pool = dev.pool
    progress(f"dev data: {len(pool)} passages, {'mapped' if dev.hit else 'prepared'} in {dev.load_s:.2f}s")
    if not len(pool):
        raise ValueError(f"{dev_file}: the evaluation pool is empty (no question has a positive passage)")

    started = time.perf_counter()
    texts = tokenized(io, cell, "dev-passages", dev_file, tokenizer,
                      lambda: tokenize_passages(tokenizer, pool, cell.text.max_length, cell.text.embed_title, cell.text.passage_format))
    tokenize_s = time.perf_counter() - started
    progress(f"encoding {len(pool)} passages ({precision}, {'cached' if texts.hit else 'fresh'} tokens)")

    paths = io.out
    encoded = encode(encoder, texts.texts, tokenizer.pad_token_id, cell.encode_batch_size, device, precision,
                     shard_dir=paths.shards, progress=progress)
    if encoded.reused_shards:
        progress(f"reused {encoded.reused_shards} shard(s) of embeddings from a stopped job")

    started = time.perf_counter()
    faiss_index = build_index(cell.index, encoded.embeddings)
    index_build_s = time.perf_counter() - started
    progress(f"encoded in {encoded.encode_s:.2f}s, {cell.index.type} index built in {index_build_s:.2f}s")

    kept = keeps_index_file(cell, repeat)
    if kept:
        save_index(faiss_index, paths.index_file)
    else:  # only its timings were wanted; an earlier run's file goes too
        paths.index_file.unlink(missing_ok=True)
    # Fixed-width UTF-8 bytes, one row per FAISS id: ~10 MB for NQ's pool, and no Python string each.
    write_file_atomic(paths.passage_ids, lambda tmp: save_array(tmp, pool.ids.fixed_width_bytes()))
    artifacts: list[Path] = ([paths.index_file] if kept else []) + [paths.passage_ids]
    return StageOutput(
        # The pool before de-duplication is what the paper indexed and reported (935,159 on NQ dev).
        metrics={"num_passages": len(pool), "pool_with_duplicates": dev.pool_with_duplicates,
                 "dim": int(encoded.embeddings.shape[1])},
        timings={
            "encode_s": encoded.encode_s,
            "index_build_s": index_build_s,
            "pei_s": encoded.encode_s + index_build_s,
            "tokenize_s": tokenize_s,
            **peak_memory(device),
        },
        artifacts=[str(p.relative_to(paths.dir)) for p in artifacts],
        details={"device": device.type, "index_type": cell.index.type, "precision": precision, "precision_requested": cell.precision.encode,
                 "passage_format": cell.text.passage_format,
                 "tokens_cached": texts.hit, "prepared_data": prepared_details(dev), "reused_shards": encoded.reused_shards,
                 "encode_nodes": list(encoded.nodes), "index_file_kept": kept,
                 # The report's Figure 1 reads the pool's token lengths from this entry.
                 "token_cache_entry": f"dev-passages-{texts.key}.npz"},
        discard=[paths.shards],
    )


def keeps_index_file(cell: CellConfig, repeat: int) -> bool:
    """Infer searches repeat 0's index; later repeats keep theirs only with `index.keep: all`."""
    return repeat == 0 or cell.index.keep == "all"
