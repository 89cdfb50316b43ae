"""Acc@k and MRR@100 on hand-built rankings, and DPR's answer matching."""

from __future__ import annotations

import pytest

from dpr_hpc.scoring.metrics import answer_accuracy, dpr_tokens, gold_rank, has_answer, retrieval_metrics


def ranking_with_gold_at(rank: int, length: int = 100) -> list[str]:
    ids = [f"n{i}" for i in range(length)]
    ids[rank - 1] = "gold"
    return ids


def test_gold_at_rank_1():
    m = retrieval_metrics([ranking_with_gold_at(1)], ["gold"], top_k=100)
    assert m == {"acc@1": 1.0, "acc@20": 1.0, "acc@100": 1.0, "mrr@100": 1.0}


def test_gold_at_rank_100():
    m = retrieval_metrics([ranking_with_gold_at(100)], ["gold"], top_k=100)
    assert m == {"acc@1": 0.0, "acc@20": 0.0, "acc@100": 1.0, "mrr@100": pytest.approx(0.01)}


def test_gold_absent_scores_reciprocal_rank_zero():
    m = retrieval_metrics([[f"n{i}" for i in range(100)]], ["gold"], top_k=100)
    assert m == {"acc@1": 0.0, "acc@20": 0.0, "acc@100": 0.0, "mrr@100": 0.0}


def test_gold_beyond_the_cut_off_does_not_count():
    m = retrieval_metrics([ranking_with_gold_at(101, length=120)], ["gold"], top_k=100)
    assert m["acc@100"] == 0.0 and m["mrr@100"] == 0.0


def test_duplicated_passages_count_once():
    # n1 appears three times above the gold: among distinct passages the gold is 3rd, not 5th.
    ranking = ["n0", "n1", "n1", "n1", "gold", "n2"]
    assert gold_rank(ranking, "gold") == 3
    m = retrieval_metrics([ranking], ["gold"], top_k=100)
    assert m["mrr@100"] == pytest.approx(1 / 3)
    assert gold_rank(["gold", "gold", "n1"], "gold") == 1


def test_metrics_average_over_questions():
    rankings = [ranking_with_gold_at(1), ranking_with_gold_at(20), ranking_with_gold_at(21), [f"n{i}" for i in range(100)]]
    m = retrieval_metrics(rankings, ["gold"] * 4, top_k=100)
    assert m["acc@1"] == 0.25
    assert m["acc@20"] == 0.5
    assert m["acc@100"] == 0.75
    assert m["mrr@100"] == pytest.approx((1 + 1 / 20 + 1 / 21 + 0) / 4)


def test_smaller_top_k_reports_only_the_ks_it_covers():
    m = retrieval_metrics([ranking_with_gold_at(3, length=10)], ["gold"], top_k=10)
    assert set(m) == {"acc@1", "mrr@10"}


# DPR's has_answer (dpr/data/qa_validation.py, match type "string") worked by hand: NFD, then
# SimpleTokenizer's pattern ([\p{L}\p{N}\p{M}]+ or one character that is neither a separator
# nor a control character), lower-cased, then an answer's tokens as a contiguous run.
ANSWER_GOLDEN = {
    # Accents: NFD turns "é" into "e" + a combining mark, which \p{M} keeps inside the word.
    "accent kept, so Cafe is not Café": ("Le Café de Flore", "Cafe", False),
    "accented answer matches accented text": ("Le Café de Flore", "café", True),
    "NFC answer matches NFD text": ("Le Cafe\u0301 de Flore", "Caf\u00e9", True),
    "accented answer does not match plain text": ("The Sao Paulo state", "São Paulo", False),
    "plain multi-token answer": ("The Sao Paulo state", "sao paulo", True),
    # Punctuation: every non-space, non-control character outside a word is its own token.
    "dotted abbreviation, token by token": ("Born in the U.S.A. in 1950.", "U.S.A.", True),
    "abbreviation without its dots": ("Born in the U.S.A. in 1950.", "USA", False),
    "hyphen splits": ("a well-known fact", "known", True),
    "apostrophe splits": ("Don't stop", "don", True),
    # Underscores are connector punctuation (\p{Pc}), not word characters as in \w.
    "underscore splits a word": ("see foo_bar here", "bar", True),
    "underscore answer keeps its underscore token": ("see foo_bar here", "foo_bar", True),
    "underscore is not a space": ("see foo_bar here", "foo bar", False),
    # Numbers: digits are \p{N}; separators inside numbers split them.
    "whole number": ("Founded in 1901.", "1901", True),
    "number inside a longer number": ("Founded in 19011.", "1901", False),
    "thousands separator splits": ("about 1,000 people", "1000", False),
    "thousands separator matched as written": ("about 1,000 people", "1,000", True),
    "decimal": ("pi is 3.14 roughly", "3.14", True),
    # Case and multi-token runs.
    "case folded": ("PARIS is the capital", "paris", True),
    "tokens must be contiguous": ("New and York", "New York", False),
    "multi-token run in the middle": ("he lived in New York City then", "new york city", True),
    "CJK run is one token": ("東京都", "東京", False),
    # An answer with no tokens: DPR's loop compares [] with an empty slice and matches.
    "empty answer matches, as in DPR": ("anything", "", True),
}


@pytest.mark.parametrize("text, answer, expected", ANSWER_GOLDEN.values(), ids=ANSWER_GOLDEN.keys())
def test_answer_matching_is_dprs(text, answer, expected):
    assert has_answer(text, [answer]) is expected


def test_dpr_tokens_follow_simple_tokenizer():
    assert dpr_tokens("U.S. foo_bar 1,000 Café") == ["u", ".", "s", ".", "foo", "_", "bar", "1", ",", "000", "cafe\u0301"]


def test_answer_accuracy_counts_first_passage_with_an_answer():
    texts = [["no", "no", "it was 1901"], ["nothing here"]]
    m = answer_accuracy(texts, [["1901"], ["x"]], top_k=100)
    assert m == {"answer_acc@1": 0.0, "answer_acc@20": 0.5, "answer_acc@100": 0.5}


def test_a_ranking_read_by_row_lets_a_duplicate_above_the_gold_push_it_down():
    """index.deduplicate: false scores as the paper's code did; our default reads distinct passages."""
    ranking, gold = ["a", "a", "b", "g"], "g"
    assert retrieval_metrics([ranking], [gold], 100)["mrr@100"] == pytest.approx(1 / 3)
    assert retrieval_metrics([ranking], [gold], 100, by_row=True)["mrr@100"] == pytest.approx(1 / 4)
    assert retrieval_metrics([["a", "a", "g"]], [gold], 2, by_row=True)["mrr@2"] == 0.0
