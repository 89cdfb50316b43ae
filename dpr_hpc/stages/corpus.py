"""Corpus stages: a cell's trained towers evaluated on a corpus apart from the dev pool (DPR's
21 M Wikipedia passages), cut into shards that separate jobs encode and search.

    encode-shard  one shard's passages through the trained passage tower: its vectors (fp16 on
                  disk with `corpus.vectors: fp16`), each passage's byte offset (its global id)
                  and its id. Encoded in chunks that a requeued job keeps, as the index stage's.
    search-shard  every question through the question tower, searched against one shard
                  (exact IndexFlatIP, or HNSW): each question's top-k scores and offsets there.
    merge         each question's top-k over every shard by score (scoring.merge), scored with
                  DPR's has_answer on the passage text (top-1/5/20/100 accuracy) and, where the
                  questions file names gold passages, Acc@k and MRR against them.

Every shard is its own stage job: a failed or preempted shard reruns alone, and the merge
reads whichever attempt of each shard is complete.
"""

from __future__ import annotations

import json
import time

import numpy as np

from dpr_hpc.fsutil import save_array, write_file_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.inputs.corpus import read_passages_at, read_questions, read_shard
from dpr_hpc.modeling.batching import tokenize_passages, tokenize_questions
from dpr_hpc.modeling.encoding import encode
from dpr_hpc.modeling.precision import resolve_precision
from dpr_hpc.modeling.searcher import exact_search_streamed, search_batch, shard_index
from dpr_hpc.planning.stage_keys import shard_of, stage_of
from dpr_hpc.scoring.merge import merge_top_k
from dpr_hpc.scoring.metrics import CORPUS_KS, answer_accuracy, retrieval_metrics
from dpr_hpc.scoring.trec import question_id, write_run
from dpr_hpc.modeling.device import peak_memory, pick_device, release_memory
from dpr_hpc.stages.common import StageIO, StageOutput, compile_for_encoding, encoding_compute, load_trained_tower, progress
from dpr_hpc.tracking.progress import Meter

VECTOR_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def encode_shard(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    corpus, shard = cell.corpus, _shard(io)
    passages_file = cell.corpus_path("passages")
    started = time.perf_counter()
    found = read_shard(passages_file, corpus.shards, shard)
    read_s = time.perf_counter() - started
    progress(f"shard {shard + 1}/{corpus.shards} of {passages_file}: {len(found)} passages, read in {read_s:.2f}s")
    device = pick_device()
    precision = resolve_precision(cell.precision.encode, device)
    encoder, tokenizer = load_trained_tower(cell, io, "passage", device)
    text = cell.text
    started = time.perf_counter()
    tokens = tokenize_passages(tokenizer, found.passages, text.max_length, text.embed_title, text.passage_format)
    tokenize_s = time.perf_counter() - started

    compiled = compile_for_encoding(cell, encoder, tokens, tokenizer.pad_token_id, device, precision)  # compute.compile, untimed
    paths = io.out
    meter = Meter(paths.meter, "encoding", "passages", len(found), before_write=io.check_claim)
    made_from = {"upstream": dict(sorted(io.upstream_digests.items())), "precision": precision}
    encoded = encode(encoder, tokens, tokenizer.pad_token_id, cell.encode_batch_size, device, precision, pad_to=text.pad_to,
                     shard_dir=paths.shards, shard_source=made_from, progress=progress, meter=meter.update, before_shard=io.check_claim)
    vectors = encoded.embeddings.astype(VECTOR_DTYPES[corpus.vectors], copy=False)
    io.check_claim()
    write_file_atomic(paths.vectors, lambda tmp: save_array(tmp, vectors))
    write_file_atomic(paths.offsets, lambda tmp: save_array(tmp, found.offsets))
    ids = np.array([p.passage_id.encode("utf-8") for p in found.passages], dtype=bytes) if len(found) else np.array([], dtype="S1")
    write_file_atomic(paths.passage_ids, lambda tmp: save_array(tmp, ids))
    progress(f"encoded {len(found)} passages in {encoded.encode_s:.2f}s; {paths.vectors.stat().st_size / 1e6:.1f} MB of {corpus.vectors} vectors")
    compute = encoding_compute(encoder, compiled)
    del encoder
    release_memory()
    return StageOutput(
        metrics={"num_passages": len(found), "dim": int(encoded.embeddings.shape[1]), "shard": shard, "shards": corpus.shards,
                 "vector_bytes": paths.vectors.stat().st_size},
        timings={"encode_s": encoded.encode_s, "tokenize_s": tokenize_s, "read_s": read_s, "meter_write_s": meter.write_s,
                 **peak_memory(device)},
        artifacts=[paths.vectors.name, paths.offsets.name, paths.passage_ids.name],
        details={"device": device.type, "precision": precision, "precision_requested": cell.precision.encode, "vectors": corpus.vectors,
                 "passages_file": str(passages_file), "reused_shards": encoded.reused_shards, "encode_nodes": list(encoded.nodes),
                 "passage_format": text.passage_format, "padding": text.padding, "compute": compute},
        discard=[paths.shards],
    )


def search_shard(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    corpus, shard = cell.corpus, _shard(io)
    encoded = io.upstream.get(f"encode-shard#{shard}")
    if encoded is None:
        raise ValueError(f"{io.job.id}: no encoded shard {shard} handed to this job")
    questions_file = cell.corpus_path("questions")
    questions = read_questions(questions_file)
    device = pick_device()
    precision = resolve_precision(cell.precision.encode, device)
    encoder, tokenizer = load_trained_tower(cell, io, "question", device)
    tokens = tokenize_questions(tokenizer, [q.question for q in questions], cell.text.max_length)
    compiled = compile_for_encoding(cell, encoder, tokens, tokenizer.pad_token_id, device, precision)
    queries = encode(encoder, tokens, tokenizer.pad_token_id, cell.encode_batch_size, device, precision, pad_to=cell.text.pad_to)
    compute = encoding_compute(encoder, compiled)
    del encoder
    release_memory()

    offsets = np.load(encoded.offsets)
    if corpus.index == "flat":  # exact: streamed over the vectors file, which is never held whole
        build_s, started = 0.0, time.perf_counter()
        scores, rows = exact_search_streamed(encoded.vectors, queries.embeddings, corpus.top_k)
    else:
        vectors = np.load(encoded.vectors)
        started = time.perf_counter()
        index = shard_index(vectors, corpus.index, cell.index)
        build_s = time.perf_counter() - started
        del vectors
        started = time.perf_counter()
        scores, rows = search_batch(index, queries.embeddings, corpus.top_k)
    search_s = time.perf_counter() - started
    hits = np.where(rows >= 0, offsets[np.clip(rows, 0, None)] if len(offsets) else -1, -1).astype(np.int64)
    progress(f"searched {len(questions)} questions against shard {shard + 1}/{corpus.shards} ({len(offsets)} passages, "
             f"{corpus.index}) in {search_s:.2f}s")
    io.check_claim()
    write_file_atomic(io.out.hit_scores, lambda tmp: save_array(tmp, scores))
    write_file_atomic(io.out.hit_offsets, lambda tmp: save_array(tmp, hits))
    return StageOutput(
        metrics={"num_questions": len(questions), "num_passages": int(len(offsets)), "shard": shard, "shards": corpus.shards},
        timings={"question_encode_s": queries.encode_s, "index_build_s": build_s, "search_s": search_s,
                 "search_mean_ms": search_s * 1000.0 / max(1, len(questions)), **peak_memory(device)},
        artifacts=[io.out.hit_scores.name, io.out.hit_offsets.name],
        details={"device": device.type, "precision": precision, "index": corpus.index, "top_k": corpus.top_k,
                 "questions_file": str(questions_file), "compute": compute},
    )


def merge(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    corpus = cell.corpus
    shards = sorted((shard_of(name), attempt) for name, attempt in io.upstream.items() if stage_of(name) == "search-shard")
    if [s for s, _ in shards] != list(range(corpus.shards)):
        raise ValueError(f"{io.job.id}: expected the search of every shard 0-{corpus.shards - 1}, got {[s for s, _ in shards]}")
    questions = read_questions(cell.corpus_path("questions"))
    started = time.perf_counter()
    scores, offsets = merge_top_k([np.load(a.hit_scores) for _, a in shards], [np.load(a.hit_offsets) for _, a in shards], corpus.top_k)
    merge_s = time.perf_counter() - started
    if len(scores) != len(questions):
        raise ValueError(f"{io.job.id}: the shards searched {len(scores)} questions, {cell.corpus_path('questions')} has {len(questions)}")

    started = time.perf_counter()
    passages = read_passages_at(cell.corpus_path("passages"), offsets.ravel())
    ranked = [[passages[int(o)] for o in row if o >= 0] for row in offsets]
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    # DPR's has_answer reads the passage's text, not its title (qa_validation.check_answer).
    metrics = {"num_questions": len(questions), "num_passages": sum(_searched_passages(a) for _, a in shards),
               "shards": corpus.shards, "corpus": corpus.label, "vectors": corpus.vectors, "index": corpus.index}
    metrics.update(answer_accuracy([[p.text for p in row] for row in ranked], [q.answers for q in questions], corpus.top_k, CORPUS_KS))
    with_gold = [i for i, q in enumerate(questions) if q.gold_ids]
    if with_gold:
        gold = retrieval_metrics([[ranked[i][j].passage_id for j in range(len(ranked[i]))] for i in with_gold],
                                 [questions[i].gold_ids for i in with_gold], corpus.top_k, ks=CORPUS_KS)
        metrics.update(gold)
        metrics["questions_with_gold"] = len(with_gold)
    match_s = time.perf_counter() - started

    io.check_claim()
    write_file_atomic(io.out.merged_scores, lambda tmp: save_array(tmp, scores))
    write_file_atomic(io.out.merged_offsets, lambda tmp: save_array(tmp, offsets))
    write_run(io.out.trec_run, [question_id(i) for i in range(len(questions))], [[p.passage_id for p in row] for row in ranked],
              [[float(s) for s in row[: len(r)]] for row, r in zip(scores, ranked)], tag=f"dpr-hpc-{io.job.key[:12]}")
    return StageOutput(
        metrics=metrics,
        timings={"merge_s": merge_s, "read_passages_s": read_s, "match_s": match_s, **peak_memory(pick_device())},
        artifacts=[io.out.merged_scores.name, io.out.merged_offsets.name, io.out.trec_run.name],
        details={"match": "DPR has_answer (string) on the passage text", "ks": list(CORPUS_KS), "top_k": corpus.top_k},
    )


def _shard(io: StageIO) -> int:
    if io.shard is None:
        raise ValueError(f"{io.job.id}: its spec names no shard (planned before corpus stages had shards?); submit again")
    return io.shard


def _searched_passages(attempt) -> int:
    return int(json.loads(attempt.record.read_text())["metrics"]["num_passages"])
