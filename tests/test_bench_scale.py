"""`dpr-hpc bench --scale`: the report's structure and its extrapolation arithmetic, on tiny
sizes (its figures come from the real run, results/bench-scale-*.json, never from a test)."""

from __future__ import annotations

import json

import pytest

from dpr_hpc.bench.scale import NQ_POOL, PhaseRun, hnsw_scaling, phase_runs, summarise
from dpr_hpc.cli.main import main


def run(phase: str, wall: float, peak: int, before: int, scale: float | None, **details) -> PhaseRun:
    return PhaseRun(phase=phase, wall_s=wall, peak_rss_bytes=peak, rss_before_bytes=before, disk_bytes=10, scale=scale, details=details)


def test_full_nq_scales_time_disk_and_only_the_memory_grown_during_the_work():
    full = run("prepare-train", wall=2.0, peak=300, before=100, scale=0.1).full_nq()
    assert full == {"wall_s": pytest.approx(20.0), "peak_rss_bytes": 2100, "disk_bytes": 100, "extrapolated": True, "factor": pytest.approx(10.0)}
    measured = run("prepare-dev", wall=2.0, peak=300, before=100, scale=1.0).full_nq()
    assert measured["extrapolated"] is False and measured["wall_s"] == 2.0 and measured["peak_rss_bytes"] == 300
    assert run("search", wall=1.0, peak=300, before=100, scale=None, note="log n").full_nq() is None


def test_hnsw_build_time_extrapolates_linearly_and_says_it_is_a_lower_bound_when_builds_grow_faster():
    sizes = [1000, 2000, 4000]
    builds = [run("hnsw-build", wall=(n / 1000) ** 1.5, peak=0, before=0, scale=n / NQ_POOL, vectors=n, index_bytes=n * 7168) for n in sizes]
    scaling = hnsw_scaling(builds)
    assert scaling["fitted_exponent"] == pytest.approx(1.5) and scaling["linear_is_lower_bound"] is True
    assert scaling["build_s_linear"] == pytest.approx(8.0 * NQ_POOL / 4000)
    assert scaling["index_bytes"] == pytest.approx(NQ_POOL * 7168, rel=1e-6) and scaling["extrapolated"]


def test_a_written_report_gives_back_its_phases_and_their_summary():
    runs = [run("prepare-train", 1.0, 300, 100, 1.0), run("load-train", 0.01, 120, 100, 1.0), run("tokenise-train", 2.0, 500, 100, 1.0),
            run("load-dev", 0.01, 120, 100, 1.0), run("tokenise-pool", 3.0, 400, 100, 1.0, token_bytes=50),
            run("encode", 1.0, 400, 150, 0.5, units=10, rss_per_unit_bytes=20),
            run("hnsw-build", 1.0, 1100, 100, 0.5, vectors=10, index_bytes=700)]
    report = {"phases": [r.to_json() for r in runs]}
    assert phase_runs(report) == runs
    summary = summarise(phase_runs(report))
    assert [goal["met"] for goal in summary["goals"]] == [True, True, False]
    stage = summary["index_stage"]
    assert stage["index_bytes"] == 1400
    # Encoding: the encode phase at full size (400 + 20 x 10 more rows) plus bert-base's weights.
    assert stage["encoding_peak_rss_bytes"] == 600 + stage["encoder_bytes"]
    # Building: the HNSW phase at full size (100 + 1000 x 2) on the encode phase's baseline (150).
    assert stage["building_peak_rss_bytes"] == 2150
    assert stage["peak_rss_bytes"] == max(2150, 600 + stage["encoder_bytes"])


def test_quick_run_reports_every_phase_with_its_own_figures_and_flags_extrapolations(tmp_path, capsys):
    assert main(["bench", "--scale", "--quick", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]) == 0
    (written,) = (tmp_path / "results").glob("bench-scale-*.json")
    report = json.loads(written.read_text())
    assert report["node"]["hostname"] and report["full_nq"] == {"train_questions": 58_880, "pool_passages": 935_159}
    phases = [row["phase"] for row in report["phases"]]
    assert phases == ["generate", "prepare-train", "prepare-dev", "load-train", "load-dev", "tokenise-train", "tokenise-pool",
                      "encode", "hnsw-build", "hnsw-build", "search"]
    by_phase = {row["phase"]: row for row in report["phases"]}
    for row in report["phases"]:
        assert row["wall_s"] > 0 and row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0, row["phase"]
        if row["phase"] != "search":  # every fraction's figure is marked as extrapolated, with its factor
            assert row["full_nq"]["extrapolated"] is True and row["full_nq"]["factor"] == pytest.approx(1 / row["scale"])
    assert by_phase["search"]["full_nq"] is None and by_phase["search"]["details"]["ms_per_query"] > 0
    # The first load prepares (and writes the columns); the second maps them and writes nothing.
    assert not by_phase["prepare-train"]["details"]["hit"] and by_phase["prepare-train"]["disk_bytes"] > 0
    assert by_phase["load-train"]["details"]["hit"] and by_phase["load-dev"]["details"]["hit"]
    assert by_phase["generate"]["disk_bytes"] > by_phase["prepare-dev"]["disk_bytes"] > 0
    assert report["hnsw_scaling"]["index_bytes"] > 0 and report["index_stage"]["extrapolated"]
    assert [goal["goal"][:12] for goal in report["goals"]] == ["train data p", "second job's", "index stage "]
    assert all(isinstance(goal["met"], bool) and goal["extrapolated"] for goal in report["goals"])
    out = capsys.readouterr().out
    assert "| phase |" in out and "(extrapolated)" in out and "not scaled" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--scale", "--train-fraction", "0"], "--train-fraction 0.0: expected a fraction in (0, 1]"),
    (["bench", "--dev-fraction", "0.5"], "--train-fraction, --dev-fraction and --work go with --scale"),
])
def test_bad_scale_arguments_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
