"""The NQ-shaped generator: NQ's counts scaled by the fraction, DPR's layout, passages that recur."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpr_hpc.demo.nq_shape import write_nq_shaped
from conftest import run_cli


@pytest.fixture(scope="module")
def nq_small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nq")
    write_nq_shaped(out, fraction=0.002, seed=3)
    return out


def test_generated_nq_shape_matches_the_fraction_and_reuses_passages(nq_small):
    train = json.loads((nq_small / "train.json").read_text())
    dev = json.loads((nq_small / "dev.json").read_text())
    assert len(train) == round(58_880 * 0.002) and len(dev) == round(6_515 * 0.002)
    pool = [c for r in dev for c in r["positive_ctxs"][:1] + r["hard_negative_ctxs"] + r["negative_ctxs"]]
    assert len(pool) == round(935_159 * 0.002)
    assert all(len(r["negative_ctxs"]) == 50 and len(r["positive_ctxs"]) >= 1 for r in train + dev)
    assert np.mean([len(r["hard_negative_ctxs"]) for r in train]) == pytest.approx(28.5, abs=1.5)
    words = [len(c["text"].split()) for r in train for c in r["hard_negative_ctxs"]]
    assert np.median(words) == 100 and 90 < np.mean(words) <= 100
    assert all(len(r["question"].split()) in (9, 10) for r in train + dev)
    by_id: dict[str, str] = {}
    for ctx in pool:
        assert by_id.setdefault(ctx["passage_id"], ctx["text"]) == ctx["text"]  # a recurring id is the same passage
    assert 0.05 < 1 - len(by_id) / len(pool) < 0.25


def test_the_command_writes_the_files_and_says_how_they_compare_with_nq(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "generate-demo", "--scale", "nq", "--fraction", "0.001", tmp_path / "nq")
    assert code == 0 and "59 questions (NQ 58,880)" in out and "pool 935 with duplicates (NQ 935,159)" in out
    assert len(json.loads((tmp_path / "nq" / "dev.json").read_text())) == 7


@pytest.mark.parametrize("args, message", [
    (["--fraction", "0.5"], "--fraction: only with --scale nq"),
    (["--scale", "nq", "--fraction", "0"], "--fraction: expected a number in (0, 1], got 0"),
    (["--scale", "nq", "--fraction", "1.5"], "--fraction: expected a number in (0, 1], got 1.5"),
])
def test_a_bad_fraction_is_a_usage_error(tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "generate-demo", *args, tmp_path / "out")
    assert code == 2 and message in err and not (tmp_path / "out").exists()
