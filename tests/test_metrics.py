"""Acc@k and MRR@100 on hand-built rankings, and DPR's answer matching."""

from __future__ import annotations

import pytest

from dpr_hpc.metrics import answer_accuracy, gold_rank, has_answer, retrieval_metrics


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


def test_answer_matching_uses_normalised_token_runs():
    assert has_answer("The capital is São Paulo, as ever.", ["sao paulo"])
    assert not has_answer("Sao Paulistas are proud", ["sao paulo"])
    assert has_answer("Founded in 1901.", ["1901"])
    assert not has_answer("Founded in 19011.", ["1901"])


def test_answer_accuracy_counts_first_passage_with_an_answer():
    texts = [["no", "no", "it was 1901"], ["nothing here"]]
    m = answer_accuracy(texts, [["1901"], ["x"]], top_k=100)
    assert m == {"answer_acc@1": 0.0, "answer_acc@20": 0.5, "answer_acc@100": 0.5}
