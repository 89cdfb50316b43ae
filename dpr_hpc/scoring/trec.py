"""TREC run and qrels files: our rankings and the dev gold in the format every IR evaluation
tool reads (trec_eval, ir_measures, pytrec_eval), so a ranking can be scored without dpr-hpc.

    run:    qid Q0 docid rank score tag     (one line per retrieved passage, rank from 1)
    qrels:  qid 0 docid relevance           (the gold passage of each question, relevance 1)

A question id is `q<position in the dev file>`. Rankings are written as distinct passages, as
the metrics read them, so scores recomputed from the run file equal the record's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from dpr_hpc.fsutil import write_bytes_atomic
from dpr_hpc.scoring.metrics import retrieval_metrics


def question_id(record_index: int) -> str:
    return f"q{record_index}"


def run_lines(qids: Sequence[str], rankings: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], tag: str) -> list[str]:
    """One line per distinct retrieved passage; a repeated passage keeps its first (best) score."""
    lines = []
    for qid, ranking, row_scores in zip(qids, rankings, scores):
        seen: set[str] = set()
        for docid, score in zip(ranking, row_scores):
            if docid in seen:
                continue
            seen.add(docid)
            lines.append(f"{qid} Q0 {docid} {len(seen)} {float(score):.6f} {tag}")
    return lines


def write_run(path: Path, qids: Sequence[str], rankings: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], tag: str) -> None:
    write_bytes_atomic(path, ("\n".join(run_lines(qids, rankings, scores, tag)) + "\n").encode())


def write_qrels(path: Path, qids: Sequence[str], gold_ids: Sequence[str]) -> None:
    write_bytes_atomic(path, "".join(f"{qid} 0 {gold} 1\n" for qid, gold in zip(qids, gold_ids)).encode())


def read_run(path: Path) -> dict[str, list[str]]:
    """Each question's passages in rank order (ranks as written, not file order)."""
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise ValueError(f"{path}:{number}: expected 'qid Q0 docid rank score tag', got {line!r}")
        ranked[fields[0]].append((int(fields[3]), fields[2]))
    return {qid: [docid for _, docid in sorted(rows)] for qid, rows in ranked.items()}


def read_qrels(path: Path) -> dict[str, str]:
    """Each question's relevant passage (the dev gold: one per question)."""
    gold = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 'qid 0 docid relevance', got {line!r}")
        if int(fields[3]) > 0:
            gold[fields[0]] = fields[2]
    return gold


def metrics_from_files(run: Path, qrels: Path, top_k: int) -> dict[str, float]:
    """Acc@k and MRR@top_k from the two files alone; a question without a ranking scores 0."""
    rankings, gold = read_run(run), read_qrels(qrels)
    qids = sorted(gold)
    return retrieval_metrics([rankings.get(q, []) for q in qids], [gold[q] for q in qids], top_k)
