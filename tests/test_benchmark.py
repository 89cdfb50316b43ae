"""The benchmark's arithmetic and a smoke run at toy sizes (its figures come from `dpr-hpc bench`,
never from a timed test)."""

from __future__ import annotations

import pytest

from dpr_hpc.bench.stages import BenchSize, encoder_flops, goals, run_benchmark


def test_encoder_flops_count_projections_feed_forward_and_attention():
    # One layer, one row of 2 tokens, hidden 4, ffn 8: 2*2*(4*16 + 2*4*8) + 2*2*1*4*4.
    assert encoder_flops([(1, 2)], hidden=4, layers=1, ffn=8) == 2 * 2 * (64 + 64) + 64
    assert encoder_flops([(2, 8)]) == 2 * encoder_flops([(1, 8)])
    assert encoder_flops([(1, 256)]) > 2 * encoder_flops([(1, 128)])  # attention grows with length squared


@pytest.mark.slow
def test_benchmark_runs_every_comparison_and_reports_goals():
    """What the report holds, never how fast this machine was: speed belongs to `dpr-hpc bench`."""
    lines: list[str] = []
    report = run_benchmark(echo=lines.append, size=BenchSize(passages=16, train_steps=1, index_vectors=300, queries=20, repeats=1))
    assert {"node", "device", "precision", "size", "matmul_peak_gflops", "encode", "train", "search", "token_cache"} <= report.keys()
    assert report["node"]["hostname"] and report["size"]["passages"] == 16 and "fp32" in report["matmul_peak_gflops"]
    assert report["encode"]["ours_per_s"] > 0 and report["train"]["paper_triples_per_s"] > 0  # measured, whatever the speed
    assert report["token_cache"]["passages"] == 20000
    assert {"first_cell_s", "second_cell_s"} <= report["token_cache"].keys()
    verdicts = goals(report)
    assert [g[0] for g in verdicts] == ["encoding >= 3x the paper's way", "encoding >= 55% of matmul peak", "training >= 3x the paper's way",
                                        "search overhead <= 10%", "second cell tokenizes in ~0 s"]
    assert all(met in (True, False) and shown for _, met, shown in verdicts)  # a verdict and its figure
    assert any(line.startswith("encoding 16 passages") for line in lines)
    assert any(line.startswith("tokenizing 20000 passages: first cell") for line in lines)
