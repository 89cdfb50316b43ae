"""The benchmark's arithmetic and a smoke run at toy sizes (its figures come from `dpr-hpc bench`,
never from a timed test)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dpr_hpc.bench.stages import (ATTENTION, MATMUL, OPTIMISER_LABEL, OUTSIDE, BenchSize, encode_batch_shapes, encoder_flops, goals,
                                  profile_call, profile_words, run_benchmark, spread, time_breakdown, with_peak)


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
    assert [g[0] for g in verdicts] == ["encoding >= 5x the paper's way", "encoding >= 70% of the bf16 matmul peak", "training >= 4x the paper's way",
                                        "gradient cache's time cost <= 20%", "search overhead <= 10%", "second cell tokenizes in ~0 s"]
    assert all(met in (True, False) and shown for _, met, shown in verdicts)  # a verdict and its figure
    assert any(line.startswith("encoding 16 passages") for line in lines)
    assert any(line.startswith("tokenizing 20000 passages: first cell") for line in lines)
    # Every phase's profiled repeat, and the spread of the timed ones.
    for profile in (report["encode"]["profile"], report["train"]["profile"], report["train"]["grad_cache_profile"], report["search"]["profile"]):
        assert profile["wall_s"] > 0 and sum(profile["shares"].values()) == pytest.approx(1.0)
    assert report["encode"]["profile"]["seconds"][MATMUL] > 0 and "FAISS search" in report["search"]["profile"]["seconds"]
    assert "optimiser step (AdamW, clipping)" in report["train"]["profile"]["seconds"]
    low, high = report["encode"]["fraction_of_peak_range"]
    assert low <= report["encode"]["fraction_of_peak"] <= high and report["encode"]["ours_per_s_spread"]["n"] == 1
    assert set(report["train"]["spread_triples_per_s"]) == {"ours", "paper", "grad_cache"}
    assert sum(line.startswith("  where the time goes (") for line in lines) == 4


def _event(name: str, self_us: float, parent=None, flops: int = 0):
    from torch.autograd import DeviceType

    return SimpleNamespace(name=name, device_type=DeviceType.CPU, self_cpu_time_total=self_us, self_device_time_total=0.0,
                           cpu_parent=parent, flops=flops)


def test_profiled_time_is_grouped_by_what_the_ops_compute_and_the_rest_is_outside_any_op():
    step = _event(OPTIMISER_LABEL, 10)
    events = [_event("aten::mm", 400_000, flops=8 * 10**9), _event("aten::addmm", 100_000, flops=2 * 10**9),
              _event("aten::_scaled_dot_product_flash_attention_for_cpu", 100_000), _event("aten::_softmax", 50_000),
              _event("aten::gelu", 50_000), _event("aten::native_layer_norm", 50_000), step, _event("aten::mul_", 90_000, parent=step),
              _event("aten::_foreach_add_", 10_000), _event("aten::copy_", 20_000), _event("aten::add", 30_000),
              _event("autograd::engine::evaluate_function: MmBackward0", 10_000)]
    breakdown = time_breakdown(events, wall_s=1.0, on_gpu=False)
    seconds = breakdown["seconds"]
    assert seconds[MATMUL] == pytest.approx(0.5) and seconds[ATTENTION] == pytest.approx(0.1)
    assert seconds["softmax"] == seconds["GELU (and other activations)"] == seconds["LayerNorm"] == pytest.approx(0.05)
    # The optimiser's ops count as the optimiser's whatever their name, under its label or as foreach ops.
    assert seconds["optimiser step (AdamW, clipping)"] == pytest.approx(0.10001)  # its label, the op under it, a foreach op
    assert seconds["copies and casts"] == pytest.approx(0.02) and seconds["elementwise and other ops"] == pytest.approx(0.03)
    assert seconds["framework (autograd nodes, annotations)"] == pytest.approx(0.01)
    assert seconds[OUTSIDE] == pytest.approx(1.0 - 0.91001)
    assert sum(breakdown["shares"].values()) == pytest.approx(1.0) and breakdown["matmul_class_share"] == pytest.approx(0.6)
    assert breakdown["matmul_kernel_gflops"] == pytest.approx(10 / 0.5)  # the profiler's FLOPs over the matmul kernels' time
    assert with_peak(breakdown, 40.0)["matmul_kernel_fraction_of_peak"] == pytest.approx(0.5)
    assert list(seconds)[0] == MATMUL and breakdown["top_ops"][0] == ["aten::mm", pytest.approx(0.4)]


def test_a_profiled_forward_pass_finds_its_matmuls_and_says_so_in_one_line():
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)).eval()
    ids = torch.randint(1, 100, (4, 16))
    with torch.inference_mode():
        profile = with_peak(profile_call(lambda: model(input_ids=ids), torch.device("cpu")), peak_gflops=1.0)
    assert profile["wall_s"] > 0 and sum(profile["shares"].values()) == pytest.approx(1.0)
    assert profile["seconds"][MATMUL] > 0 and profile["seconds"]["LayerNorm"] > 0 and profile["matmul_gflop"] > 0
    line = profile_words("encode", profile, "fp32")
    assert line.startswith("  where the time goes (encode, one profiled run of") and "matmul kernels at" in line


def test_a_figure_keeps_the_spread_of_its_repeats():
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    # Our encode's batches: longest first, 64 a batch, each padded to its longest rounded up to 8.
    assert encode_batch_shapes(np.array([10, 30, 20]), batch=2, multiple=8) == [(2, 32), (1, 16)]
