"""`dpr-hpc bench --scale`: the report's structure and its extrapolation arithmetic, on tiny
sizes (its figures come from the real run, results/bench-scale-*.json, never from a test)."""

from __future__ import annotations

import json

import pytest

from dpr_hpc.bench.scale import NQ_POOL, PhaseRun, hnsw_scaling, phase_runs, summarise
from dpr_hpc.bench.scale_corpus import BERT_BASE_BYTES, corpus_summary, gpu_encode_rate
from dpr_hpc.errors import UsageError
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
    assert main(["bench", "--scale", "--quick", "--corpus-passages", "0", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]) == 0
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
    (["bench", "--corpus-only"], "--corpus-passages, --corpus-only and --gpu-check go with --scale"),
    (["bench", "--scale", "--corpus-passages", "-5"], "--corpus-passages -5: expected a number of passages"),
    (["bench", "--scale", "--corpus-only", "--corpus-passages", "0"], "--corpus-passages 0: expected a number of passages"),
])
def test_bad_scale_arguments_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def corpus_runs(passages: int = 1000) -> list[PhaseRun]:
    encode = run("corpus-encode-shard", 10.0, 5000, 400, None, passages=passages, vectors_bytes=passages * 3072, model_bytes=100,
                 rss_per_passage_bytes=3800, rss_libraries_bytes=300)
    search = run("corpus-search-shard", 2.0, 4000, 300, None, passages=passages, vectors_bytes=passages * 3072, model_bytes=0,
                 rss_per_passage_bytes=3072, rss_libraries_bytes=300)
    merge = run("corpus-merge", 1.5, 900, 800, None, questions=3610, shards=50, k=100)
    return [encode, search, merge]


def test_the_corpus_phase_extrapolates_each_shard_task_to_wikipedia_in_50_shards_and_says_so():
    corpus = summarise(corpus_runs())["corpus"]
    assert corpus["extrapolated"] and corpus["corpus"] == {"passages": 21_015_324, "shards": 50, "shard_passages": 420_307, "questions": 3610}
    assert corpus["factor"] == pytest.approx(420.307)
    encode = corpus["encode_task"]
    assert encode["wall_s"] == pytest.approx(4203.07) and encode["disk_bytes"] == int(10 * 420.307)
    # Only what grows with the passages scales; the tiny encoder's weights give way to bert-base's.
    assert encode["peak_rss_bytes"] == int(5000 + 3800 * (420_307 - 1000) - 100 + BERT_BASE_BYTES)
    assert encode["rss_ratio"] == pytest.approx(encode["peak_rss_bytes"] / (420_307 * 3072 + BERT_BASE_BYTES))
    assert corpus["search_task"]["peak_rss_bytes"] == 4000 + 3072 * (420_307 - 1000)
    assert corpus["all_shards"]["vectors_fp32_bytes"] == 21_015_324 * 768 * 4 == 2 * corpus["all_shards"]["vectors_fp16_bytes"]
    assert corpus["merge"] == {"wall_s": 1.5, "questions": 3610, "measured": True}
    assert corpus["gpu_hours"]["hours"] is None and corpus["gpu_hours"]["note"].startswith("none measured")
    text = corpus_summary({"corpus": corpus})
    assert "EXTRAPOLATED x420 from a synthetic shard of 1,000" in text and "GPU-hours: none measured" in text


def test_the_corpus_goals_judge_shard_memory_as_run_and_at_a_real_shard_and_the_merge_time():
    goals = {goal["goal"]: goal for goal in summarise(corpus_runs())["goals"]}
    assert set(goals) == {"encode-shard peak RSS <= 1.5x vectors + model, real shard", "search-shard peak RSS <= 1.5x vectors + model, real shard",
                          "encode-shard peak RSS <= 1.5x vectors + model, as run", "search-shard peak RSS <= 1.5x vectors + model, as run",
                          "merge 3,610 x 50 shards x top-100 <= 60 s"}
    assert goals["merge 3,610 x 50 shards x top-100 <= 60 s"]["met"] and goals["merge 3,610 x 50 shards x top-100 <= 60 s"]["measured"] == "1.50 s"
    assert goals["search-shard peak RSS <= 1.5x vectors + model, as run"]["met"] is True  # 4000 <= 1.5 x 3,072,000
    assert goals["search-shard peak RSS <= 1.5x vectors + model, real shard"]["extrapolated"] is True


def test_a_gpu_check_report_prices_encoding_wikipedia_in_gpu_hours(tmp_path):
    report = tmp_path / "gpu-check-node-1.json"
    report.write_text(json.dumps({"smoke": False, "node": {"gpu_name": "NVIDIA H100 80GB HBM3"},
                                  "pei": {"sample": 16384, "ours": {"sample_s": 4.0, "precision": "bf16"}}}))
    rate = gpu_encode_rate(report)
    assert rate["passages_per_s"] == 4096 and rate["gpu"] == "NVIDIA H100 80GB HBM3"
    gpu = summarise(corpus_runs(), rate)["corpus"]["gpu_hours"]
    assert gpu["hours"] == pytest.approx(21_015_324 / 4096 / 3600) and gpu["per_shard_hours"] == pytest.approx(gpu["hours"] / 50)


@pytest.mark.parametrize("content, message", [
    ("not json", "expected a `dpr-hpc gpu-check` report"),
    (json.dumps({"pei": {"skipped": "--budget-s 1 ran out"}}), "expected a `dpr-hpc gpu-check` report"),
    (json.dumps({"smoke": True, "pei": {"sample": 64, "ours": {"sample_s": 1.0}}}), "a --smoke report"),
])
def test_a_file_that_is_no_gpu_measurement_is_refused_by_name(tmp_path, content, message):
    report = tmp_path / "report.json"
    report.write_text(content)
    with pytest.raises(UsageError, match=message) as refused:
        gpu_encode_rate(report)
    assert str(report) in str(refused.value)


def test_the_corpus_phase_alone_measures_each_shard_task_in_its_own_process(tmp_path, capsys):
    assert main(["bench", "--scale", "--quick", "--corpus-only", "--corpus-passages", "300", "--out", str(tmp_path / "results")]) == 0
    (written,) = (tmp_path / "results").glob("bench-scale-*.json")
    report = json.loads(written.read_text())
    assert [row["phase"] for row in report["phases"]] == ["corpus-encode-shard", "corpus-search-shard", "corpus-merge"]
    encode, search, merge = report["phases"]
    assert encode["peak_rss_bytes"] > 0 and encode["details"]["passages"] == 300
    assert encode["details"]["fp16_bytes"] < encode["details"]["fp32_bytes"] < encode["disk_bytes"]  # both written, and the ids
    assert search["details"]["questions"] == 200 and merge["details"]["shards"] == 50
    assert report["corpus"]["extrapolated"] and report["corpus"]["gpu_hours"]["hours"] is None
    assert len(report["goals"]) == 5 and "hnsw_scaling" not in report
    out = capsys.readouterr().out
    assert "Wikipedia (21,015,324 passages in 50 shards of 420,307), EXTRAPOLATED" in out and "| phase |" not in out
