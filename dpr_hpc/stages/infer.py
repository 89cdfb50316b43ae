"""Infer stage: encode the dev questions, search top-k one query at a time, score the rankings.

ITA (the paper's inference time average) is the mean over queries of one `index.search` call
each; question encoding is timed apart and excluded, as in the paper. Its SD is the sample SD
(ddof 1, `ita_sd_ddof` in the record); the paper's code took np.std's default, ddof 0.
"""

from __future__ import annotations

import json
import time

import numpy as np

from dpr_hpc.data import dev_questions, evaluation_pool, read_records
from dpr_hpc.grid import CellConfig
from dpr_hpc.layout import RunLayout
from dpr_hpc.metrics import answer_accuracy, distinct, retrieval_metrics
from dpr_hpc.modeling.batching import tokenize_questions
from dpr_hpc.modeling.encoding import encode
from dpr_hpc.modeling.precision import resolve_precision
from dpr_hpc.modeling.searcher import load_index, search_one_at_a_time
from dpr_hpc.plan import StageJob
from dpr_hpc.stages.common import StageOutput, load_trained_tower, peak_memory, pick_device, progress, tokenized

# Every infer repeat searches the index of index repeat 0, so repeats differ only in timing.
SEARCHED_INDEX_REPEAT = 0
ITA_SD_DDOF = 1


def infer(cell: CellConfig, run: RunLayout, repeat: int = 0) -> StageOutput:
    device = pick_device()
    encoder, tokenizer = load_trained_tower(cell, run, "question", device)
    dev_file = cell.data_path("dev")
    records = read_records(dev_file)
    questions = dev_questions(records, source=str(dev_file))
    if not questions:
        raise ValueError(f"{dev_file}: no question has a positive passage")

    precision = resolve_precision(cell.precision.encode, device)
    tokens = tokenized(run, cell, "dev-questions", dev_file, tokenizer,
                      lambda: tokenize_questions(tokenizer, [q.question for q in questions], cell.text.max_length))
    encoded = encode(encoder, tokens.texts, tokenizer.pad_token_id, cell.encode_batch_size, device, precision)
    query_vectors, question_encode_s = encoded.embeddings, encoded.encode_s

    faiss_index = load_index(run.index_file(cell.cell_id, SEARCHED_INDEX_REPEAT), cell.index)
    passage_ids = json.loads(run.passage_ids_file(cell.cell_id, SEARCHED_INDEX_REPEAT).read_text())
    progress(f"searching top {cell.top_k} of {len(passage_ids)} passages for {len(questions)} questions, one at a time")
    rows, times_ms = search_one_at_a_time(faiss_index, query_vectors, cell.top_k)

    rankings = [[passage_ids[j] for j in row if j >= 0] for row in rows]
    metrics: dict = {"num_questions": len(questions)}
    metrics.update(retrieval_metrics(rankings, [q.gold_id for q in questions], cell.top_k))
    if any(q.answers for q in questions):
        texts = {p.passage_id: p.text for p in evaluation_pool(records, source=str(dev_file))}
        ranked_texts = [[texts[pid] for pid in distinct(ranking)] for ranking in rankings]
        metrics.update(answer_accuracy(ranked_texts, [q.answers for q in questions], cell.top_k))

    job = StageJob(cell.cell_id, "infer", repeat)
    run.stage(job).dir.mkdir(parents=True, exist_ok=True)
    np.save(run.rankings_file(job), rows)
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
        artifacts=[run.rankings_file(job).name],
        details={"device": device.type, "searched_index_repeat": SEARCHED_INDEX_REPEAT, "precision": precision,
                 "precision_requested": cell.precision.encode, "ita_sd_ddof": ITA_SD_DDOF, "tokens_cached": tokens.hit},
    )
