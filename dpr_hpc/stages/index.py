"""Index stage: encode the evaluation passage pool and build the FAISS index (the paper's PEI).

Embeddings go to disk in shards as they are encoded; a job stopped by its time limit or
preemption is requeued and goes on from the last finished shard, and its PEI adds up the
encoding time of every shard, whichever job wrote it.

PEI is encoding plus the FAISS adds; with `timing.pei_includes_tokenization` it also holds this
job's tokenization of the pool, done fresh, as the paper's timer did. The index holds each
passage id once, or with `index.deduplicate: false` every pool entry, as the paper's code did.
"""

from __future__ import annotations

import time
from pathlib import Path

from dpr_hpc.fsutil import save_array, write_file_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.tracking.progress import Meter
from dpr_hpc.modeling.batching import tokenize_passages
from dpr_hpc.modeling.device import peak_memory, pick_device, release_memory
from dpr_hpc.modeling.encoding import encode
from dpr_hpc.modeling.precision import resolve_precision
from dpr_hpc.modeling.searcher import build_index_from_file, save_index
from dpr_hpc.inputs.prepared import load_dev
from dpr_hpc.stages.common import (StageIO, StageOutput, compile_for_encoding, encoding_compute, load_trained_tower, prepared_details,
                                   progress, tokenized, tokenized_fresh)


def index(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    device = pick_device()
    precision = resolve_precision(cell.precision.encode, device)
    encoder, tokenizer = load_trained_tower(cell, io, "passage", device)
    dev_file = cell.data_path("dev")
    dev = load_dev(dev_file, io.prepared_cache)
    pool = dev.indexed_pool(cell.index.deduplicate)
    progress(f"dev data: {len(pool)} pool rows ({len(dev.pool)} distinct), {'mapped' if dev.hit else 'prepared'} in {dev.load_s:.2f}s")
    if not len(pool):
        raise ValueError(f"{dev_file}: the evaluation pool is empty (no question has a positive passage)")

    # The distinct pool and the pool with duplicates are different texts to the token cache.
    what = "dev-passages" if cell.index.deduplicate else "dev-pool-entries"
    text = cell.text
    tokenize = lambda: tokenize_passages(tokenizer, pool, text.max_length, text.embed_title, text.passage_format)  # noqa: E731
    if cell.timing.pei_includes_tokenization:
        texts, tokenize_s = tokenized_fresh(io, cell, what, dev, tokenizer, tokenize)
    else:
        started = time.perf_counter()
        texts = tokenized(io, cell, what, dev, tokenizer, tokenize)
        tokenize_s = time.perf_counter() - started
    progress(f"encoding {len(pool)} passages ({precision}, {'cached' if texts.hit else 'fresh'} tokens, padding: {text.padding})")

    compiled = compile_for_encoding(cell, encoder, texts.texts, tokenizer.pad_token_id, device, precision)
    compute = encoding_compute(encoder, compiled)
    paths = io.out
    meter = Meter(paths.meter, "encoding", "passages", len(texts.texts), before_write=io.check_claim)
    # A shard is kept only if made from these very weights at this precision: a training rerun
    # under the same key (GPU non-determinism) or a node that resolves `auto` otherwise encodes anew.
    made_from = {"upstream": dict(sorted(io.upstream_digests.items())), "precision": precision}
    encoded = encode(encoder, texts.texts, tokenizer.pad_token_id, cell.encode_batch_size, device, precision,
                     pad_to=text.pad_to, shard_dir=paths.shards, shard_source=made_from, progress=progress, meter=meter.update,
                     before_shard=io.check_claim)
    if encoded.reused_shards:
        progress(f"reused {encoded.reused_shards} shard(s) of embeddings from a stopped job")

    # The embeddings go to disk and out of memory, with the tokens and the encoder, before FAISS
    # builds: the index then reads them a chunk at a time, and the stage's peak memory is about
    # the index's own size, not the index plus a second copy of every vector.
    dim = int(encoded.embeddings.shape[1])
    io.check_claim()
    save_array(paths.embeddings, encoded.embeddings)
    encode_s, reused_shards, encode_nodes = encoded.encode_s, encoded.reused_shards, encoded.nodes
    tokens_hit, tokens_key = texts.hit, texts.key
    del encoded, texts, encoder
    release_memory()
    built = build_index_from_file(cell.index, paths.embeddings)
    faiss_index, index_build_s = built.index, built.add_s
    progress(f"encoded in {encode_s:.2f}s, {cell.index.type} index built in {index_build_s:.2f}s")

    kept = keeps_index_file(cell, repeat)
    io.check_claim()
    if kept:
        save_index(faiss_index, paths.index_file)
    else:  # only its timings were wanted; an earlier run's file goes too
        paths.index_file.unlink(missing_ok=True)
    # Fixed-width UTF-8 bytes, one row per FAISS id: ~10 MB for NQ's pool, and no Python string each.
    write_file_atomic(paths.passage_ids, lambda tmp: save_array(tmp, pool.id_bytes()))
    artifacts: list[Path] = ([paths.index_file] if kept else []) + [paths.passage_ids]
    pei_includes_tokenization = cell.timing.pei_includes_tokenization
    return StageOutput(
        # num_passages: the index's rows. The pool before de-duplication is what the paper
        # indexed and reported (935,159 on NQ dev).
        metrics={"num_passages": len(pool), "distinct_passages": len(dev.pool), "pool_with_duplicates": dev.pool_with_duplicates,
                 "dim": dim},
        timings={
            "encode_s": encode_s,
            "index_build_s": index_build_s,
            "pei_s": encode_s + index_build_s + (tokenize_s if pei_includes_tokenization else 0.0),
            "tokenize_s": tokenize_s,
            "meter_write_s": meter.write_s,  # left out of encode_s
            **peak_memory(device),
        },
        artifacts=[str(p.relative_to(paths.dir)) for p in artifacts],
        details={"device": device.type, "index_type": cell.index.type, "precision": precision, "precision_requested": cell.precision.encode,
                 "compute": compute,
                 "passage_format": cell.text.passage_format,
                 "tokens_cached": tokens_hit, "prepared_data": prepared_details(dev), "reused_shards": reused_shards,
                 "encode_nodes": list(encode_nodes), "index_file_kept": kept,
                 # The timing protocol (README, Fidelity): what PEI holds, and how the index was built.
                 "pei_includes_tokenization": pei_includes_tokenization, "padding": text.padding, "pad_to": text.pad_to,
                 "deduplicate": cell.index.deduplicate, "index_add_batch_size": cell.index.add_batch_size,
                 "index_add_calls": built.add_calls,
                 # The report's Figure 1 reads the pool's token lengths from this entry.
                 "token_cache_entry": f"dev-passages-{tokens_key}.npz"},
        discard=[paths.shards, paths.embeddings],
    )


def keeps_index_file(cell: CellConfig, repeat: int) -> bool:
    """Infer searches repeat 0's index; later repeats keep theirs only with `index.keep: all`."""
    return repeat == 0 or cell.index.keep == "all"
