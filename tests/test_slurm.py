"""The SLURM backend against the real test cluster (munge, slurmdbd with MariaDB, slurmctld, and
$DPR_HPC_TEST_NODES slurmd nodes), which the slurm_cluster fixture brings up with
tests/slurm/cluster-up.sh. Where it cannot (not root, no apt) these tests skip with the reason,
unless DPR_HPC_REQUIRE_SLURM=1 (set by .ci/run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_grid
from slurmtools import PROFILE, HeldTraining, cli, records, running_on, status, wait_for, wait_until_settled
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.store.paths import StageStore

pytestmark = pytest.mark.slow


def small_grid(folder: Path, demo: Path, train_file: Path | None = None, name: str = "slurm", repeats: int = 2,
               untrained: bool = True) -> Path:
    """A trained tiny BERT with `repeats` index and infer repeats and, with `untrained`, the same
    weights evaluated as given."""
    evaluated = f"- {{name: untrained, encoder: {demo}/models/tiny-bert, evaluate_only: true, embedding_sizes: [64]}}" if untrained else ""
    return write_grid(folder, f"""
        name: {name}
        data: {{train: {train_file or demo / 'train.json'}, dev: {demo}/dev.json}}
        defaults:
          train: {{epochs: 3, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: 5, batch_size: 16}}
          text: {{max_length: 64}}
          encode_batch_size: 128
        blocks:
          - {{name: trained, encoder: {demo}/models/tiny-bert, embedding_sizes: [64], repeats: {{index: {repeats}, infer: {repeats}}}}}
          {evaluated}
    """, f"{name}.yaml")


def test_grid_completes_on_the_real_cluster_with_job_ids_and_nodes(slurm_cluster, demo_assets, tmp_path):
    grid = small_grid(tmp_path, demo_assets)
    submitted = cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True)
    assert "7 submitted" in submitted.stdout
    assert len(records(tmp_path)) < 7  # submit returns with the jobs queued: the scheduler runs them
    jobs = wait_until_settled(tmp_path, grid)
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 7
    assert all(j["job_id"].isdigit() and j["node"] for j in jobs)
    done = records(tmp_path)
    assert sorted(r["node"]["slurm_job_id"] for r in done) == sorted(j["job_id"] for j in jobs)
    assert all(r["node"]["slurm_node"] for r in done)

    again = cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True)
    assert "0 submitted, 7 already complete" in again.stdout

    cli("collect", grid, "--median", "--out", tmp_path / "results", cwd=tmp_path, check=True)
    report_cost_comes_from_sacct(tmp_path, grid)
    on_slurm = pd.read_csv(tmp_path / "results" / "slurm-median.csv")
    local_grid = small_grid(tmp_path, demo_assets, name="local")
    # Its own runs root: in the same store the local run would find every job already done.
    cli("submit", local_grid, "--backend", "local", "--runs-root", tmp_path / "local-runs", cwd=tmp_path, check=True)
    cli("collect", local_grid, "--median", "--out", tmp_path / "results", "--runs-root", tmp_path / "local-runs", cwd=tmp_path, check=True)
    local = pd.read_csv(tmp_path / "results" / "local-median.csv")
    assert list(on_slurm.columns) == list(local.columns) and on_slurm.shape == local.shape
    assert on_slurm.drop(columns=[c for c in on_slurm.columns if c.endswith(("_s", "_ms"))]).notna().equals(
        local.drop(columns=[c for c in local.columns if c.endswith(("_s", "_ms"))]).notna()
    )


def report_cost_comes_from_sacct(work: Path, grid: Path) -> None:
    """The report's cost table: queue wait, elapsed time and MaxRSS from sacct for every job,
    equal to what sacct says of one of them when asked on its own."""
    from dpr_hpc.tracking.slurm_queue import duration_s, memory_mb
    from dpr_hpc.reporting.cost import cost_table
    from dpr_hpc.store.records import Records
    from dpr_hpc.store.runs import runs_for

    cli("report", grid, "--out", work / "results", cwd=work, check=True)
    report = (work / "results" / "slurm" / "report.md").read_text()
    assert "sacct: 7 of 7 SLURM jobs, in one call" in report
    layout, plan = runs_for(grid, work / "runs")[0]
    cost = cost_table(plan, Records(layout.store), Ledger.read(layout.store)).jobs
    assert len(cost) == 7
    assert all(source.startswith("sacct: wall, wait, MaxRSS") for source in cost["source"])
    assert cost[["wall_s", "queue_wait_s", "peak_rss_mb", "cpu_hours"]].notna().all().all()
    one = cost.iloc[0]
    lines = subprocess.run(["sacct", "-n", "-P", "-j", one["job_id"], "-o", "JobIDRaw,Submit,Start,Elapsed,MaxRSS"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    allocation = next(line.split("|") for line in lines if line.split("|")[0] == one["job_id"])
    wait = (pd.Timestamp(allocation[2]) - pd.Timestamp(allocation[1])).total_seconds()
    assert one["queue_wait_s"] == wait and one["wall_s"] == duration_s(allocation[3])
    assert one["peak_rss_mb"] == max(memory_mb(line.split("|")[4]) or 0.0 for line in lines)


def test_failed_train_blocks_its_stages_and_retry_failed_resubmits_only_those(slurm_cluster, demo_assets, tmp_path):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "no id or text"}]}]))
    grid = small_grid(tmp_path, demo_assets, train_file)
    cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True)
    jobs = wait_until_settled(tmp_path, grid)
    by_stage = {(j["cell_id"].split("-")[-2], j["stage"], j["repeat"]): j for j in jobs}
    train = by_stage[("bs16", "train", 0)]
    assert train["state"] == "FAILED" and "exit code 1" in train["detail"]
    assert Path(train["log"]).is_file() and "DataFormatError" in Path(train["log"]).read_text()
    blocked = [j for j in jobs if j["cell_id"] == train["cell_id"] and j["stage"] != "train"]
    assert [j["state"] for j in blocked] == ["BLOCKED"] * 4
    assert {j["state"] for j in jobs if j["cell_id"] != train["cell_id"]} == {"COMPLETED"}
    assert subprocess.run(["squeue", "-h", "-j", ",".join(j["job_id"] for j in blocked)], capture_output=True, text=True).stdout.strip() == ""

    again = cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path)
    assert again.returncode == 1 and "0 submitted" in again.stdout and "--retry-failed" in again.stdout

    train_file.write_text((demo_assets / "train.json").read_text())
    retried = cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, "--retry-failed", cwd=tmp_path, check=True)
    assert "5 submitted, 2 already complete" in retried.stdout
    assert {j["state"] for j in wait_until_settled(tmp_path, grid)} == {"COMPLETED"}
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    # The fixed train file is another input: a new train key, submitted once; the failed one stays recorded.
    assert [len(h) for key, h in ledger.items() if key.startswith("train/")] == [1, 1]


def test_concurrent_submits_submit_each_stage_once_and_cancel_clears_them(slurm_cluster, demo_assets, tmp_path):
    grid = small_grid(tmp_path, demo_assets)
    command = [sys.executable, "-m", "dpr_hpc", "submit", str(grid), "--backend", "slurm", "--profile", str(PROFILE), "--hold"]
    both = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in both]
    assert all(p.returncode == 0 for p in both)
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    assert len(ledger) == 7 and all(len(history) == 1 for history in ledger.values())
    assert sorted("7 submitted" in out for out in outputs) == [False, True]
    ids = [history[0]["job_id"] for history in ledger.values()]
    queued = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert sorted(queued) == sorted(ids)
    assert {j["state"] for j in status(tmp_path, grid)} == {"PENDING"}
    local = cli("submit", grid, "--backend", "local", cwd=tmp_path, check=True)  # one writer: SLURM has them
    # Each held job is named with the state SLURM gives it (scheduler.Standing.describe).
    assert local.stdout.count("left alone: pending on SLURM as job") == 7 and "0 ran" in local.stdout

    # A second grid under the same runs root that shares the trained cell's jobs (5 of 7) and
    # has one more index and infer repeat: cancelling either grid keeps what the other plans.
    other = small_grid(tmp_path, demo_assets, name="other", repeats=3, untrained=False)
    second = cli("submit", other, "--backend", "slurm", "--profile", PROFILE, "--hold", cwd=tmp_path, check=True)
    assert "2 submitted" in second.stdout, second.stdout
    first_cancel = cli("cancel", grid, cwd=tmp_path, check=True).stdout
    assert "grid slurm: cancelled 2 SLURM jobs" in first_cancel and first_cancel.count("grid(s) other plan it too") == 5
    other_cancel = cli("cancel", other, cwd=tmp_path, check=True).stdout
    assert "grid other: cancelled 2 SLURM jobs" in other_cancel and other_cancel.count("grid(s) slurm plan it too") == 5
    ids = [history[-1]["job_id"] for history in Ledger.read(StageStore.at(tmp_path / "runs")).entries.values()]
    pending = subprocess.run(["squeue", "-h", "-t", "PD", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert len(ids) == 9 and len(pending) == 5  # scancel is synchronous: the 4 cancelled ones are no longer pending
    cli("cancel", cwd=tmp_path, check=True)  # every grid under the runs root: nothing is kept
    deadline = time.monotonic() + 30
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "cancelled jobs still queued"
        time.sleep(1)


def one_training_grid(folder: Path, demo: Path, name: str, epochs: int, slurm_train: str, checkpoint: str = "{}") -> Path:
    return write_grid(folder, f"""
        name: {name}
        data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
        defaults:
          train: {{epochs: {epochs}, learning_rate: 1.0e-3, dropout: 0.1, warmup_steps: 5, batch_size: 16}}
          text: {{max_length: 64}}
          index: {{type: flat}}
          checkpoint: {checkpoint}
        blocks:
          - {{name: long, encoder: {demo}/models/tiny-bert, embedding_sizes: [64]}}
        slurm:
          stages: {{train: {slurm_train}}}
    """, f"{name}.yaml")


def train_record(work: Path, name: str) -> dict:
    (path,) = work.glob("runs/store/train/*/r0/result.json")
    return json.loads(path.read_text())


def restarts_shown(progress: str) -> int:
    """The restart count in status's 'epoch 3/40, step 1200/16000, 2 restarts'."""
    return int(progress.rsplit(", ", 1)[-1].split()[0])


def test_training_past_its_time_limit_is_requeued_until_it_finishes(slurm_cluster, demo_assets, tmp_path):
    """A 2-minute limit with the warning 30 s before it: each run trains until the warning,
    checkpoints, and submitit requeues it. The training is held at its step boundaries
    (DPR_HPC_HOLD_TRAINING) until a second run of it has started, so it outlasts a run by
    construction, however fast the CPU; released, it finishes.
    SLURM may send the warning up to 60 s early: with a 1-minute limit it came as a run started,
    before any handler was installed, and killed it (exit 12, FAILED); here it comes 30 s in at
    the earliest."""
    held = HeldTraining(tmp_path)
    grid = one_training_grid(tmp_path, demo_assets, "limit", epochs=3, slurm_train='{time: "2", signal_delay_s: 30}')
    cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True, env=held.env)
    seen_progress = set()

    def resumed() -> bool:  # status shows the training running again after its first requeue
        jobs = status(tmp_path, grid)
        seen_progress.update(j["detail"].split("; ")[-1] for j in jobs if j["stage"] == "train" and "restart" in j["detail"])
        return any(restarts_shown(p) >= 1 for p in seen_progress)

    wait_for(resumed, 900, "the training to be requeued at its time limit and resumed", every_s=3)
    held.release()
    jobs = wait_until_settled(tmp_path, grid)
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 3
    record = train_record(tmp_path, "limit")
    segments = record["details"]["segments"]
    assert len(segments) >= 2 and record["details"]["restarts"] == len(segments) - 1
    # Requeues of one job, in order. SLURM may send the warning up to 60 s early, even as a run
    # starts: before the training is running, submitit then requeues at once and that run
    # leaves no segment, so the restart counts may skip one (seen first, and in the middle).
    counts = [s["slurm_restart_count"] for s in segments]
    assert counts == sorted(set(counts)), counts
    assert segments[0]["first_step"] == 0
    assert {s["job_id"] for s in segments} == {jobs[0]["job_id"]}  # requeued: the same SLURM job
    assert [s["ended_by"] for s in segments] == ["SIGUSR2"] * (len(segments) - 1) + ["finished"]
    assert all(b["first_step"] == a["first_step"] + a["steps"] for a, b in zip(segments, segments[1:]))
    assert sum(s["steps"] for s in segments) == record["metrics"]["steps"]
    assert record["timings"]["ttt_s"] == pytest.approx(sum(s["train_s"] for s in segments), rel=1e-12)
    assert any(restarts_shown(p) >= 1 for p in seen_progress), seen_progress
    history = subprocess.run(["sacct", "-n", "-X", "--duplicates", "-j", jobs[0]["job_id"], "-o", "State"], capture_output=True, text=True).stdout.split()
    assert history.count("REQUEUED") >= len(segments) - 1 and history[-1] == "COMPLETED", history


def test_scontrol_requeue_of_a_running_training_resumes_from_its_checkpoint(slurm_cluster, demo_assets, tmp_path):
    """A simulated node failure: SLURM kills the running job and queues it again. The training
    is held (DPR_HPC_HOLD_TRAINING) once it has written a checkpoint, so the requeue finds it
    running past one, however fast the CPU."""
    held = HeldTraining(tmp_path)
    grid = one_training_grid(tmp_path, demo_assets, "requeue", epochs=3, slurm_train="{}", checkpoint="{every_steps: 4}")
    cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True, env=held.env)
    train_job = wait_for(lambda: running_on(tmp_path, grid, "train"), 600, "the training to run")
    checkpointed = held.hold_after_a_checkpoint(tmp_path)
    subprocess.run(["scontrol", "requeue", train_job["job_id"]], check=True)
    held.release()
    jobs = wait_until_settled(tmp_path, grid)
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 3
    segments = train_record(tmp_path, "requeue")["details"]["segments"]
    assert len(segments) == 2
    assert segments[0]["ended_by"] in ("SIGTERM", "killed after its last checkpoint")
    assert segments[1]["first_step"] >= checkpointed["step"] > 0  # resumed from a checkpoint, not from step 0
    assert segments[1]["first_step"] == segments[0]["first_step"] + segments[0]["steps"]
    assert segments[1]["slurm_restart_count"] == 1


def test_cancelled_training_resumes_from_its_checkpoint_on_a_plain_resubmit(slurm_cluster, demo_assets, tmp_path):
    """scancel sends SIGTERM: the training checkpoints at the next step and stops; SLURM
    cancels its index and infer jobs. `submit` again (no --retry-failed) resumes the training
    and resubmits the jobs that never ran. The training is held past a checkpoint until then."""
    held = HeldTraining(tmp_path)
    grid = one_training_grid(tmp_path, demo_assets, "cancelled", epochs=3, slurm_train="{}", checkpoint="{every_steps: 4}")
    cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True, env=held.env)
    train_job = wait_for(lambda: running_on(tmp_path, grid, "train"), 600, "the training to run")
    checkpointed = held.hold_after_a_checkpoint(tmp_path)
    subprocess.run(["scancel", train_job["job_id"]], check=True)
    jobs = wait_until_settled(tmp_path, grid)
    assert jobs[0]["state"] == "INTERRUPTED" and "submit again to resume" in jobs[0]["detail"], jobs[0]
    assert [j["state"] for j in jobs[1:]] == ["BLOCKED", "BLOCKED"]

    held.release()
    again = cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=tmp_path, check=True)
    assert "resuming it" in again.stdout and "3 submitted" in again.stdout, again.stdout
    assert [j["state"] for j in wait_until_settled(tmp_path, grid)] == ["COMPLETED"] * 3
    segments = train_record(tmp_path, "cancelled")["details"]["segments"]
    assert [s["ended_by"] for s in segments] == ["SIGTERM", "finished"]
    assert segments[1]["first_step"] == segments[0]["steps"] >= checkpointed["step"] > 0
    assert segments[0]["job_id"] != segments[1]["job_id"]


def test_placement_keys_reach_the_real_job_and_a_user_comment_keeps_adoption_working(slurm_cluster, demo_assets, tmp_path):
    """A profile's comment, exclusive and sbatch_extra, and submit's --nodelist, as SLURM records
    them; a submit killed between sbatch and its ledger write is still adopted by the next one,
    found by the tag in front of the user's comment."""
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout.split()[0]  # one node, not node[1-3]
    profile = tmp_path / "placed.yaml"
    profile.write_text(PROFILE.read_text().replace("defaults:\n", "defaults:\n  comment: paper-run\n  exclusive: true\n  sbatch_extra: {spread-job: true}\n"))
    grid = small_grid(tmp_path, demo_assets)
    command = [sys.executable, "-m", "dpr_hpc", "submit", str(grid), "--backend", "slurm", "--profile", str(profile), "--hold", "--nodelist", node]
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "DPR_HPC_FAULT": "kill-after-sbatch:1"})
    assert killed.returncode == 137, killed.stdout + killed.stderr
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "adopting SLURM job" in again.stdout, again.stdout + again.stderr
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    assert len(ledger) == 7 and all(len(history) == 1 for history in ledger.values())
    first = next(history[0]["job_id"] for history in ledger.values() if history[0].get("adopted"))
    shown = subprocess.run(["scontrol", "show", "job", first], capture_output=True, text=True, check=True).stdout
    assert f"Comment=dpr-hpc:{next(h[0]['tag'] for h in ledger.values() if h[0].get('adopted'))},paper-run" in shown, shown
    assert "OverSubscribe=NO" in shown and f"ReqNodeList={node}" in shown, shown
    cli("cancel", grid, cwd=tmp_path, check=True)


def test_cancel_include_shared_cancels_the_jobs_another_grid_plans_too(slurm_cluster, demo_assets, tmp_path):
    """Two grids under one runs root share the trained cell's five jobs: `cancel --include-shared`
    of one cancels all seven of its jobs on the real scheduler, and only the other grid's own
    two stay queued."""
    grid = small_grid(tmp_path, demo_assets)
    other = small_grid(tmp_path, demo_assets, name="other", repeats=3, untrained=False)
    for g in (grid, other):
        cli("submit", g, "--backend", "slurm", "--profile", PROFILE, "--hold", cwd=tmp_path, check=True)
    ids = [history[-1]["job_id"] for history in Ledger.read(StageStore.at(tmp_path / "runs")).entries.values()]
    own = sorted(j["job_id"] for j in status(tmp_path, other) if j["repeat"] == 2)  # index r2, infer r2: only `other` plans them
    assert len(ids) == 9 and len(own) == 2
    cancelled = cli("cancel", grid, "--include-shared", cwd=tmp_path, check=True).stdout
    assert "grid slurm: cancelled 7 SLURM jobs" in cancelled and "plan it too" not in cancelled, cancelled
    left = subprocess.run(["squeue", "-h", "-t", "PD", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert sorted(left) == own, left
