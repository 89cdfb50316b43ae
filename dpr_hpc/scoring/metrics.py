"""Retrieval metrics, the paper's (Acc@k and MRR@100 against the gold passage id) and DPR's
answer-string top-k accuracy, so figures compare with both.

A ranking is read as distinct passages: a passage id that appears again further down is
ignored, so duplicates neither push the gold down nor count twice. With `by_row` (an index of
every pool entry, `index.deduplicate: false`) it is read row by row, as the paper's code scored
it: a duplicate ranked above the gold pushes the gold down.
"""

from __future__ import annotations

import unicodedata
from typing import Collection, Sequence

import regex

PAPER_KS = (1, 20, 100)
# DPR's table 2 reports top-5 as well, over all of Wikipedia.
CORPUS_KS = (1, 5, 20, 100)


def distinct(ranking: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [pid for pid in ranking if not (pid in seen or seen.add(pid))]


def gold_rank(ranking: Sequence[str], gold_id: str | Collection[str], by_row: bool = False) -> int | None:
    """1-based rank of the gold passage (or the first of several, a corpus question's gold
    ids) among distinct passages (or the first row holding it, `by_row`), None when absent."""
    golds = {gold_id} if isinstance(gold_id, str) else set(gold_id)
    for rank, pid in enumerate(ranking if by_row else distinct(ranking), start=1):
        if pid in golds:
            return rank
    return None


def retrieval_metrics(rankings: Sequence[Sequence[str]], gold_ids: Sequence[str | Collection[str]], top_k: int, by_row: bool = False,
                      ks: Sequence[int] = PAPER_KS) -> dict[str, float]:
    """Acc@k for the paper's k (or `ks`) up to top_k, and MRR@top_k (reciprocal rank 0 when not retrieved)."""
    if len(rankings) != len(gold_ids):
        raise ValueError("one ranking per gold id expected")
    if not rankings:
        raise ValueError("no questions to score")
    ranks = [gold_rank(list(r)[:top_k], g, by_row) for r, g in zip(rankings, gold_ids)]
    n = len(ranks)
    metrics = {f"acc@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in ks if k <= top_k}
    metrics[f"mrr@{top_k}"] = sum(1.0 / r for r in ranks if r is not None) / n
    return metrics


def answer_accuracy(ranked_texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]], top_k: int,
                    ks: Sequence[int] = PAPER_KS) -> dict[str, float]:
    """DPR's top-k accuracy: a question counts when a top-k passage contains one of its answers."""
    hits = [_first_hit(texts[:top_k], ans) for texts, ans in zip(ranked_texts, answers)]
    n = len(hits)
    return {f"answer_acc@{k}": sum(1 for h in hits if h is not None and h <= k) / n for k in ks if k <= top_k}


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """DPR's `has_answer` with match type "string": True when the passage's tokens contain an
    answer's tokens as a contiguous run. As in DPR, an answer with no tokens matches any passage."""
    tokens = dpr_tokens(text)
    for answer in answers:
        needle = dpr_tokens(answer)
        if any(tokens[i : i + len(needle)] == needle for i in range(len(tokens) - len(needle) + 1)):
            return True
    return False


def _first_hit(texts: Sequence[str], answers: Sequence[str]) -> int | None:
    for rank, text in enumerate(texts, start=1):
        if has_answer(text, answers):
            return rank
    return None


# DPR's SimpleTokenizer (dpr/utils/tokenizers.py): a run of letters, digits and combining marks,
# or any one character that is neither a separator nor a control character, with its flags.
_DPR_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def dpr_tokens(text: str) -> list[str]:
    """DPR's answer-matching tokens: NFD-normalised (accents become combining marks that stay in
    their word, so "Café" is not "Cafe"), split by SimpleTokenizer's pattern, lower-cased."""
    return [match.group().lower() for match in _DPR_TOKEN.finditer(unicodedata.normalize("NFD", text))]
