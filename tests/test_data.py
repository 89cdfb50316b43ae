"""Reading DPR's biencoder format: the training negative and the deduplicated evaluation pool."""

from __future__ import annotations

import pytest

from dpr_hpc.data import DataFormatError, dev_questions, evaluation_pool, pool_with_duplicates, training_examples


def ctx(pid: str) -> dict:
    return {"title": f"t{pid}", "text": f"text {pid}", "passage_id": pid}


RECORDS = [
    {"question": "q1", "answers": ["a"], "positive_ctxs": [ctx("p1"), ctx("p1b")], "hard_negative_ctxs": [ctx("h1"), ctx("shared")], "negative_ctxs": [ctx("n1")]},
    {"question": "q2", "answers": ["b"], "positive_ctxs": [ctx("p2")], "hard_negative_ctxs": [], "negative_ctxs": [ctx("shared"), ctx("p1")]},
    {"question": "q3", "answers": [], "positive_ctxs": [], "hard_negative_ctxs": [ctx("x")], "negative_ctxs": []},
]


def test_training_uses_first_positive_and_first_hard_negative_else_plain():
    examples = training_examples(RECORDS)
    assert [(e.question, e.positive.passage_id, e.negative.passage_id) for e in examples] == [("q1", "p1", "h1"), ("q2", "p2", "shared")]


def test_training_examples_keep_the_whole_negative_pool_for_shuffling():
    examples = training_examples(RECORDS)
    assert [[n.passage_id for n in e.negatives] for e in examples] == [["h1", "shared"], ["shared", "p1"]]


def test_pool_holds_first_positive_and_all_negatives_once_each():
    pool = [p.passage_id for p in evaluation_pool(RECORDS)]
    assert pool == ["p1", "h1", "shared", "n1", "p2"]  # p1b is not a first positive; q3 has no positive


def test_pool_size_before_deduplication_counts_what_the_papers_code_indexed():
    # q1: p1 + h1, shared + n1 = 4; q2: p2 + shared, p1 = 3; q3 has no positive.
    assert pool_with_duplicates(RECORDS) == 7
    assert len(evaluation_pool(RECORDS)) == 5


def test_dev_questions_carry_gold_id_and_answers():
    assert [(q.question, q.gold_id, q.answers) for q in dev_questions(RECORDS)] == [("q1", "p1", ("a",)), ("q2", "p2", ("b",))]


def test_psg_id_is_accepted_and_malformed_context_is_named():
    records = [{"question": "q", "positive_ctxs": [{"title": "", "text": "t", "psg_id": 7}]}]
    assert evaluation_pool(records)[0].passage_id == "7"
    with pytest.raises(DataFormatError, match=r"record 0: positive_ctxs\[0\]"):
        evaluation_pool([{"question": "q", "positive_ctxs": [{"title": "x"}]}])
