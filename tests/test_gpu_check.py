"""`dpr-hpc gpu-check`: its smoke mode runs every measurement on tiny shapes on the CPU, so the
script cannot rot between the rare runs on a GPU (its figures come from those, never from here)."""

from __future__ import annotations

import json

import pytest

from dpr_hpc.cli.main import main
from dpr_hpc.bench.gpu_check import SHAPES, SMOKE_SHAPES, Budget, build_tower


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
    assert "extrapolated" in capsys.readouterr().out


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
