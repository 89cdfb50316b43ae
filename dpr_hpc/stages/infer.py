"""Infer stage: encode the dev questions, search top-k one query at a time, score the rankings.

ITA (the paper's inference time average) is the mean over queries of one `index.search` call
each (with `timing.ita_includes_fetch`, plus reading the result rows: each passage's id, title
and text and its vector, as the paper's `get_nearest_examples` fetched them); question encoding
is timed apart and excluded, as in the paper. Its SD is the sample SD (ddof 1, `ita_sd_ddof` in
the record); the paper's code took np.std's default, ddof 0.

An index of every pool entry (`index.deduplicate: false`) is scored row by row, as the paper's
code scored it; the TREC run file still lists distinct passages, as trec_eval requires.
"""

from __future__ import annotations

import numpy as np

from dpr_hpc.fsutil import save_array, write_file_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.scoring.metrics import answer_accuracy, retrieval_metrics
from dpr_hpc.modeling.batching import tokenize_questions
from dpr_hpc.modeling.device import peak_memory, pick_device
from dpr_hpc.modeling.encoding import encode
from dpr_hpc.modeling.precision import resolve_precision
from dpr_hpc.modeling.searcher import load_index, search_one_at_a_time
from dpr_hpc.planning.plan import SEARCHED_INDEX_REPEAT
from dpr_hpc.inputs.prepared import load_dev
from dpr_hpc.stages.common import (StageIO, StageOutput, compile_for_encoding, encoding_compute, load_trained_tower, prepared_details,
                                   progress, tokenized)
from dpr_hpc.scoring.trec import question_id, write_qrels, write_run


ITA_SD_DDOF = 1  # the sample SD; the paper's code used np.std's default, ddof 0


def infer(cell: CellConfig, io: StageIO, repeat: int = 0) -> StageOutput:
    device = pick_device()
    encoder, tokenizer = load_trained_tower(cell, io, "question", device)
    dev_file = cell.data_path("dev")
    dev = load_dev(dev_file, io.prepared_cache)
    questions = dev.dev_questions()
    if not questions:
        raise ValueError(f"{dev_file}: no question has a positive passage")

    precision = resolve_precision(cell.precision.encode, device)
    tokens = tokenized(io, cell, "dev-questions", dev, tokenizer,
                      lambda: tokenize_questions(tokenizer, [q.question for q in questions], cell.text.max_length))
    compiled = compile_for_encoding(cell, encoder, tokens.texts, tokenizer.pad_token_id, device, precision)
    encoded = encode(encoder, tokens.texts, tokenizer.pad_token_id, cell.encode_batch_size, device, precision, pad_to=cell.text.pad_to)
    query_vectors, question_encode_s = encoded.embeddings, encoded.encode_s

    if io.index is None:
        raise ValueError(f"{io.job.id}: no index handed to this job")
    faiss_index = load_index(io.index.index_file, cell.index)
    passage_ids = np.load(io.index.passage_ids, mmap_mode="r")
    pool = dev.indexed_pool(cell.index.deduplicate)
    if len(passage_ids) != len(pool):  # its rows are read as the prepared pool's rows below
        raise ValueError(f"{io.index.passage_ids}: {len(passage_ids)} passage ids, but {dev_file} has a pool of {len(pool)} rows: "
                         "the index was built from other dev data")
    progress(f"searching top {cell.top_k} of {len(passage_ids)} passages for {len(questions)} questions, one at a time")
    fetch = result_rows(pool, faiss_index) if cell.timing.ita_includes_fetch else None
    found = search_one_at_a_time(faiss_index, query_vectors, cell.top_k, fetch)
    rows, times_ms = found.ids, found.times_ms

    # Only the retrieved passages' ids and texts become Python strings (top-k per question).
    retrieved = [[int(j) for j in row if j >= 0] for row in rows]
    rankings = [[passage_id(passage_ids[j]) for j in ranked] for ranked in retrieved]
    ranking_scores = [[float(s) for j, s in zip(row, scores) if j >= 0] for row, scores in zip(rows, found.scores)]
    by_row = not cell.index.deduplicate
    metrics: dict = {"num_questions": len(questions)}
    metrics.update(retrieval_metrics(rankings, [q.gold_id for q in questions], cell.top_k, by_row=by_row))
    if any(q.answers for q in questions):
        # The index's rows are the indexed pool's rows (the same dev content); read row by row.
        ranked_texts = [[pool.text(j) for j in ranked] for ranked in retrieved]
        metrics.update(answer_accuracy(ranked_texts, [q.answers for q in questions], cell.top_k))

    io.check_claim()
    write_file_atomic(io.out.rankings, lambda tmp: save_array(tmp, rows))
    qids = [question_id(q.record_index) for q in questions]
    write_run(io.out.trec_run, qids, rankings, ranking_scores, tag=f"dpr-hpc-{io.job.key[:12]}")
    write_qrels(io.out.trec_qrels, qids, [q.gold_id for q in questions])
    return StageOutput(
        metrics=metrics,
        timings={
            "ita_mean_ms": float(times_ms.mean()),
            "ita_sd_ms": float(times_ms.std(ddof=ITA_SD_DDOF)) if len(times_ms) > ITA_SD_DDOF else 0.0,
            "ita_median_ms": float(np.median(times_ms)),
            "search_total_s": float(times_ms.sum() / 1000.0),
            "question_encode_s": question_encode_s,
            **peak_memory(device),
        },
        artifacts=[io.out.rankings.name, io.out.trec_run.name, io.out.trec_qrels.name],
        details={"device": device.type, "searched_index_repeat": SEARCHED_INDEX_REPEAT, "precision": precision,
                 "precision_requested": cell.precision.encode, "compute": encoding_compute(encoder, compiled), "ita_sd_ddof": ITA_SD_DDOF, "tokens_cached": tokens.hit,
                 "prepared_data": prepared_details(dev),
                 # The timing and scoring protocol (README, Fidelity).
                 "ita_includes_fetch": cell.timing.ita_includes_fetch, "padding": cell.text.padding, "pad_to": cell.text.pad_to,
                 "deduplicate": cell.index.deduplicate, "ranked_by": "row" if by_row else "distinct passage"},
    )


def result_rows(pool, faiss_index):
    """What `timing.ita_includes_fetch` reads inside each query's timer: every result row's
    passage (id, title, text) and its vector, as the paper's `get_nearest_examples` returned
    its rows (text and embedding columns)."""
    def fetch(found: np.ndarray):
        hits = found[found >= 0]
        return [pool[int(j)] for j in hits], faiss_index.reconstruct_batch(hits)

    return fetch


def passage_id(stored) -> str:
    """One entry of an index's passage_ids.npy: fixed-width UTF-8 bytes, or a str in stores
    written before the ids were saved as bytes."""
    return stored.decode("utf-8") if isinstance(stored, bytes) else str(stored)

