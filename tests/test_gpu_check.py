"""`dpr-hpc gpu-check`: its smoke mode runs every measurement on tiny shapes on the CPU, so the
script cannot rot between the rare runs on a GPU (its figures come from those, never from here)."""

from __future__ import annotations

import json

import pytest

from dpr_hpc.cli.main import main
from dpr_hpc.bench.gpu_check import PEAK_TFLOPS, SHAPES, SMOKE_SHAPES, Budget, build_tower, card_peak, datasheet_peak


def test_smoke_run_reports_every_measurement_tagged_and_flags_extrapolations(tmp_path, capsys):
    assert main(["gpu-check", "--smoke", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("gpu-check-smoke-*.json")
    report = json.loads(written.read_text())
    assert report["smoke"] is True and report["node"]["hostname"] and report["memory_cap"] is None
    assert set(report["batch_size_auto"]) == set(SHAPES)
    for name, probed in report["batch_size_auto"].items():
        assert probed["batch_size"] >= 1 and probed["paper_batch"] == SHAPES[name].paper_batch
        assert [p["batch_size"] for p in probed["probes"]][:2] == [1, 2]  # the probe's own doubling ran
    cache = report["grad_cache"]
    assert cache["grad_cache"]["chunk"] and cache["grad_cache"]["batch"] > cache["grad_cache"]["chunk"] and cache["plain"]["chunk"] is None
    assert report["pei"]["extrapolated"] and report["pei"]["paper_way"]["pool_s"] > report["pei"]["paper_way"]["sample_s"] > 0
    assert report["ttt"]["extrapolated"] and report["ttt"]["ours"]["ttt_s"] == pytest.approx(report["ttt"]["ours"]["epoch_s"] * 40)
    assert report["ttt"]["paper_way"]["pad_to"] is not None and report["ttt"]["ours"]["pad_to"] is None
    # The fraction-of-peak path: on the CPU, against the matmul peak this run measured.
    fractions = report["fraction_of_peak"]
    peak = fractions["peaks"][report["precision"]]
    assert peak["source"].startswith("measured") and peak["gflops"] == peak["measured_matmul_gflops"] > 0
    for name in ("encode", "train", "encode_paper_way", "train_paper_way"):
        assert fractions[name]["gflops"] > 0 and fractions[name]["fraction_of_peak"] > 0, name
    assert fractions["train_paper_way"]["precision"] == "fp32"
    for profile in (fractions["encode_profile"], fractions["train_profile"]):
        assert sum(profile["shares"].values()) == pytest.approx(1.0) and profile["clock"] == "cpu"
    assert "optimiser step (AdamW, clipping)" in fractions["train_profile"]["seconds"]
    out = capsys.readouterr().out
    assert "extrapolated" in out and "of the fp32 peak" in out and "where the time goes (train" in out


def test_gpu_check_without_a_gpu_is_a_usage_error_unless_smoke(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_spent_budget_skips_the_measurement_and_says_so():
    lines: list[str] = []
    result = Budget(0).run("PEI encoding", lambda: pytest.fail("must not run"), lines.append)
    assert "ran out" in result["skipped"] and lines == ["PEI encoding: skipped, the --budget-s ran out"]


@pytest.mark.parametrize("name", sorted(SMOKE_SHAPES))
def test_smoke_towers_are_the_real_families(name):
    import torch

    tower = build_tower(SMOKE_SHAPES[name], torch.device("cpu"))
    assert tower.backbone.config.model_type == SHAPES[name].family


@pytest.mark.parametrize("name, millions", [("bert-base-uncased", 109.5), ("distilbert-base-uncased", 66.4),
                                           ("google/electra-small-discriminator", 13.5), ("huawei-noah/TinyBERT_General_4L_312D", 14.4)])
def test_real_shapes_have_the_published_parameter_counts(name, millions):
    """Built on the meta device (no memory): the parameter counts the four models publish."""
    import torch

    with torch.device("meta"):
        tower = build_tower(SHAPES[name], torch.device("meta"))
    assert sum(p.numel() for p in tower.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-PCIE-40GB", "fp32", 19.5),
    ("NVIDIA A10", "bf16", 125.0), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA L40S", "bf16", 362.05), ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2), ("NVIDIA GeForce RTX 3090", "fp16", 71.0), ("NVIDIA TITAN RTX", "fp16", 130.5),
])
def test_a_known_card_is_held_to_its_dense_datasheet_peak(name, precision, tflops):
    gflops, source = datasheet_peak(name, precision)
    assert gflops == pytest.approx(tflops * 1000) and ("datasheet" in source or "whitepaper" in source)


def test_a_card_or_precision_the_table_does_not_know_has_no_datasheet_peak():
    assert datasheet_peak("NVIDIA A10G", "bf16") is None  # not the A10, whose row must not catch it
    assert datasheet_peak("Tesla V100-SXM2-32GB", "bf16") is None  # Volta has no bf16 tensor cores
    assert all(source for _, _, source in PEAK_TFLOPS)  # every figure says where it comes from


def test_an_unknown_gpu_is_held_to_the_matmul_peak_measured_in_the_run(monkeypatch):
    from types import SimpleNamespace

    import dpr_hpc.bench.stages as stages
    import dpr_hpc.provenance as provenance

    monkeypatch.setattr(stages, "_matmul_peak", lambda precision, device: 1234.0)
    monkeypatch.setattr(provenance, "device_tags", lambda: {"device": "cuda", "gpu_name": "Imaginary GPU 9000"})
    lines: list[str] = []
    peak = card_peak(SimpleNamespace(type="cuda"), "bf16", lines.append)
    assert peak["gflops"] == 1234.0 and not peak["datasheet"] and "Imaginary GPU 9000 is not in PEAK_TFLOPS" in peak["source"]
    monkeypatch.setattr(provenance, "device_tags", lambda: {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3"})
    peak = card_peak(SimpleNamespace(type="cuda"), "bf16", lines.append)
    assert peak["gflops"] == pytest.approx(989_400) and peak["datasheet"] and peak["measured_matmul_gflops"] == 1234.0
