"""The benchmark's arithmetic and a smoke run at toy sizes (its figures come from `dpr-hpc bench`,
never from a timed test)."""

from __future__ import annotations

import pytest

from dpr_hpc.benchmark import BenchSize, encoder_flops, goals, run_benchmark


def test_encoder_flops_count_projections_feed_forward_and_attention():
    # One layer, one row of 2 tokens, hidden 4, ffn 8: 2*2*(4*16 + 2*4*8) + 2*2*1*4*4.
    assert encoder_flops([(1, 2)], hidden=4, layers=1, ffn=8) == 2 * 2 * (64 + 64) + 64
    assert encoder_flops([(2, 8)]) == 2 * encoder_flops([(1, 8)])
    assert encoder_flops([(1, 256)]) > 2 * encoder_flops([(1, 128)])  # attention grows with length squared


@pytest.mark.slow
def test_benchmark_runs_every_comparison_and_reports_goals():
    lines: list[str] = []
    report = run_benchmark(echo=lines.append, size=BenchSize(passages=16, train_steps=1, index_vectors=300, queries=20, repeats=1))
    assert report["encode"]["ours_per_s"] > 0 and report["train"]["paper_triples_per_s"] > 0
    assert report["node"]["hostname"] and report["matmul_peak_gflops"]["fp32"] > 0
    assert report["token_cache"]["second_cell_s"] < report["token_cache"]["first_cell_s"]
    assert [g[0] for g in goals(report)][0] == "encoding >= 3x the paper's way"
    assert any(line.startswith("encoding 16 passages") for line in lines)
