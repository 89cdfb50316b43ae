"""Reading DPR's biencoder format (through the prepared form the stages read): the training
negative and the deduplicated evaluation pool."""

from __future__ import annotations

import json

import pytest

from dpr_hpc.errors import DataFormatError
from dpr_hpc.inputs.prepared import load_dev, load_train


def ctx(pid: str) -> dict:
    return {"title": f"t{pid}", "text": f"text {pid}", "passage_id": pid}


RECORDS = [
    {"question": "q1", "answers": ["a"], "positive_ctxs": [ctx("p1"), ctx("p1b")], "hard_negative_ctxs": [ctx("h1"), ctx("shared")], "negative_ctxs": [ctx("n1")]},
    {"question": "q2", "answers": ["b"], "positive_ctxs": [ctx("p2")], "hard_negative_ctxs": [], "negative_ctxs": [ctx("shared"), ctx("p1")]},
    {"question": "q3", "answers": [], "positive_ctxs": [], "hard_negative_ctxs": [ctx("x")], "negative_ctxs": []},
]


@pytest.fixture
def prepared(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    train = load_train(data, tmp_path / "cache")
    return [train.example(i) for i in range(len(train))], load_dev(data, tmp_path / "cache")


def test_training_uses_first_positive_and_first_hard_negative_else_plain(prepared):
    examples, _ = prepared
    assert [(e.question, e.positive.passage_id, e.negative.passage_id) for e in examples] == [("q1", "p1", "h1"), ("q2", "p2", "shared")]


def test_training_examples_keep_the_whole_negative_pool_for_shuffling(prepared):
    examples, _ = prepared
    assert [[n.passage_id for n in e.negatives] for e in examples] == [["h1", "shared"], ["shared", "p1"]]


def test_pool_holds_first_positive_and_all_negatives_once_each(prepared):
    pool = [p.passage_id for p in prepared[1].pool]
    assert pool == ["p1", "h1", "shared", "n1", "p2"]  # p1b is not a first positive; q3 has no positive
    # What the index stage saves as passage_ids.npy: ids of different lengths, one row each.
    assert [i.decode() for i in prepared[1].pool.ids.fixed_width_bytes()] == pool


def test_pool_size_before_deduplication_counts_what_the_papers_code_indexed(prepared):
    # q1: p1 + h1, shared + n1 = 4; q2: p2 + shared, p1 = 3; q3 has no positive.
    assert prepared[1].pool_with_duplicates == 7
    assert len(prepared[1].pool) == 5


def test_the_pool_with_duplicates_is_every_entry_in_file_order(prepared):
    """What `index.deduplicate: false` indexes, as the paper's code did: each entry its own row."""
    entries = prepared[1].indexed_pool(deduplicate=False)
    assert [p.passage_id for p in entries] == ["p1", "h1", "shared", "n1", "p2", "shared", "p1"]
    assert [i.decode() for i in entries.id_bytes()] == [p.passage_id for p in entries]
    assert entries.text(5) == entries[2].text and prepared[1].indexed_pool(deduplicate=True) is prepared[1].pool


def test_dev_questions_carry_gold_id_and_answers(prepared):
    questions = prepared[1].dev_questions()
    assert [(q.question, q.gold_id, q.answers, q.record_index) for q in questions] == [("q1", "p1", ("a",), 0), ("q2", "p2", ("b",), 1)]


def test_psg_id_is_accepted_and_malformed_context_is_named(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "", "text": "t", "psg_id": 7}]}]))
    assert load_dev(good, tmp_path / "cache").pool[0].passage_id == "7"
    bad.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "x"}]}]))
    with pytest.raises(DataFormatError, match=r"bad.json: record 0: positive_ctxs\[0\]"):
        load_dev(bad, tmp_path / "cache")
