"""The grid, run for real through the local backend (submitit's LocalExecutor, one process per
stage job) on the offline demo's data and tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import trained_and_untrained_grid, write_grid

pytestmark = pytest.mark.slow


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpr_hpc", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def demo_run(demo_assets, tmp_path_factory):
    """One trained tiny BERT (the demo's settings) with repeated timing stages, and the same
    weights evaluated untrained."""
    work = tmp_path_factory.mktemp("e2e")
    grid = trained_and_untrained_grid(work, demo_assets, epochs=25, warmup_steps=20)
    first = cli("submit", grid, "--backend", "local", cwd=work)
    assert first.returncode == 0, first.stdout + first.stderr  # every test below reads what this run built
    return work, grid, first


def collected(work: Path, grid: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`collect` into `out`, a folder of the calling test's own, which must succeed."""
    done = cli("collect", grid, *flags, "--out", out, cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def status_json(work: Path, grid: Path) -> list[dict]:
    done = cli("status", grid, "--json", cwd=work)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]["rows"]


def test_submit_runs_every_stage_and_status_shows_them_completed(demo_run):
    work, grid, _ = demo_run
    jobs = status_json(work, grid)
    assert [(j["stage"], j["repeat"]) for j in jobs] == [
        ("train", 0), ("index", 0), ("index", 1), ("infer", 0), ("infer", 1), ("infer", 2), ("index", 0), ("infer", 0)
    ]
    assert {j["state"] for j in jobs} == {"COMPLETED"}
    assert all(j["node"] for j in jobs)


def test_second_submit_starts_nothing(demo_run):
    work, grid, _ = demo_run
    logs_before = sorted(work.glob("runs/store/*/*/*/jobs/*_log.out"))
    again = cli("submit", grid, "--backend", "local", cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 ran, 8 already complete" in again.stdout
    assert sorted(work.glob("runs/store/*/*/*/jobs/*_log.out")) == logs_before


def test_records_carry_timings_and_node_tags(demo_run):
    work, _, _ = demo_run
    records = [json.loads(p.read_text()) for p in work.glob("runs/store/*/*/*/result.json")]
    assert len(records) == 8
    for record in records:
        node = record["node"]
        assert node["hostname"] and node["device"] == "cpu" and node["cpu_model"]
        assert node["libraries"]["torch"] and node["libraries"]["faiss-cpu"]
        assert record["started_at"] < record["finished_at"]
    train = next(r for r in records if r["stage"] == "train")
    assert train["timings"]["ttt_s"] > 0 and len(train["metrics"]["epoch_loss"]) == 25
    assert train["metrics"]["epoch_loss"][-1] < train["metrics"]["epoch_loss"][0]
    index = next(r for r in records if r["stage"] == "index")
    assert index["timings"]["pei_s"] == pytest.approx(index["timings"]["encode_s"] + index["timings"]["index_build_s"])
    assert index["timings"]["peak_rss_mb"] > 0


def test_collect_writes_one_row_per_repeat_and_median_per_cell(demo_run, tmp_path):
    work, grid, _ = demo_run
    collected(work, grid, tmp_path)
    rows = pd.read_csv(tmp_path / "e2e.csv")
    assert len(rows) == 3 + 1
    assert {"ttt_s", "pei_s", "ita_mean_ms", "ita_sd_ms", "acc@1", "acc@20", "acc@100", "mrr@100", "train_node", "index_node", "infer_node"} <= set(rows.columns)
    done = collected(work, grid, tmp_path, "--median")
    median = pd.read_csv(tmp_path / "e2e-median.csv")
    assert len(median) == 2
    trained = median[median.group == "trained"].iloc[0]
    assert (trained.n_index, trained.n_infer) == (2, 3)
    per_repeat = rows[rows.group == "trained"].ita_mean_ms
    assert trained.ita_mean_ms == pytest.approx(per_repeat.median())
    header = next(line for line in done.stdout.splitlines() if line.startswith("cell_id"))
    assert header.split()[:4] == ["cell_id", "encoder", "ES", "BS"]


def test_trained_encoders_retrieve_clearly_better_than_untrained(demo_run, tmp_path):
    work, grid, _ = demo_run
    collected(work, grid, tmp_path, "--median")
    median = pd.read_csv(tmp_path / "e2e-median.csv").set_index("group")
    trained, untrained = median.loc["trained"], median.loc["untrained"]
    assert trained["mrr@100"] > 2 * untrained["mrr@100"]
    assert trained["acc@20"] > untrained["acc@20"] + 0.15


def test_failing_train_stage_is_reported_and_blocks_its_dependants(demo_assets, tmp_path):
    broken = tmp_path / "broken-train.json"
    broken.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "no id or text"}]}]))
    grid = write_grid(tmp_path, f"""
        name: broken
        data: {{train: {broken}, dev: {demo_assets}/dev.json}}
        blocks: [{{name: b, encoder: {demo_assets}/models/tiny-bert, embedding_sizes: [64]}}]
    """)
    done = cli("submit", grid, "--backend", "local", cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "BLOCKED" in done.stdout
    jobs = status_json(tmp_path, grid)
    assert [j["state"] for j in jobs] == ["FAILED", "BLOCKED", "BLOCKED"]
    assert "positive_ctxs[0]" in jobs[0]["detail"]
    assert Path(jobs[0]["log"]).is_file() and "DataFormatError" in Path(jobs[0]["log"]).read_text()


def test_data_is_tokenized_once_per_tokenizer_and_shared_by_stages_and_cells(demo_run):
    """Both cells use the same tokenizer: the dev passages and questions are tokenized by the
    first index and infer job, and every later job (other repeats, the other cell) reads them."""
    work, _, _ = demo_run
    records = [json.loads(p.read_text()) for p in sorted(work.glob("runs/store/*/*/*/result.json"))]
    by_time = sorted(records, key=lambda r: r["started_at"])
    for stage in ("index", "infer"):
        cached = [r["details"]["tokens_cached"] for r in by_time if r["stage"] == stage]
        assert cached == [False] + [True] * (len(cached) - 1), (stage, cached)
    entries = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in work.glob("runs/cache/tokens/*.npz"))
    assert entries == ["dev-passages", "dev-questions", "train-negatives", "train-positives", "train-questions"]


def test_index_repeats_after_the_first_keep_no_index_file_and_records_name_their_encoding_nodes(demo_run):
    work, _, _ = demo_run
    records = {r: json.loads(p.read_text()) for p in work.glob("runs/store/index/*/*/result.json")
               for r in [p.parent.name] if json.loads(p.read_text())["config"]["train"] is not None}
    r0, r1 = records["r0"], records["r1"]
    attempt = {r: work / "runs" / "store" / "index" / records[r]["key"] / r / "attempts" / f"a{records[r]['attempt']}" for r in records}
    assert (attempt["r0"] / "index.faiss").is_file()
    assert not (attempt["r1"] / "index.faiss").exists()
    for folder in attempt.values():  # the scratch the index was built from is gone with the record written
        assert not (folder / "embeddings.npy").exists() and not (folder / "shards").exists()
    assert sorted(r0["artifacts"]) == ["index.faiss", "passage_ids.npy"] and list(r1["artifacts"]) == ["passage_ids.npy"]
    assert r1["timings"]["index_build_s"] > 0 and not r1["details"]["index_file_kept"]
    assert r0["details"]["encode_nodes"] == [r0["node"].get("slurm_node") or r0["node"]["hostname"]]
