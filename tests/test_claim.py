"""One writer per stage job: two copies started at once, exactly one runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import held_elsewhere, run_folder, train_folder
from dpr_hpc.claim import StageClaimedError, claim_stage
from dpr_hpc.locks import LockFile
from dpr_hpc.plan import StageJob
from dpr_hpc.runstate import load_plan
from dpr_hpc.stages.runner import EXIT_CLAIMED
from dpr_hpc.store import StageStore

RUN_ONE = "import sys; from dpr_hpc.stages.runner import run_stage_job; run_stage_job(sys.argv[1], 'train', sys.argv[2], 0)"


@pytest.mark.slow
def test_two_copies_of_a_stage_job_one_runs_and_the_other_exits_naming_it(demo_assets, tmp_path):
    layout, cell_id = run_folder(tmp_path, demo_assets, "twice", extra="    train: {epochs: 20}\n")
    key = load_plan(layout).keys[cell_id]["train"]
    folder = train_folder(layout, cell_id)
    command = [sys.executable, "-c", RUN_ONE, str(layout.runs_root), key]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not folder.claim.exists():  # wait on the state, not on a sleep
        assert first.poll() is None and time.monotonic() < deadline, "the first copy never claimed the job"
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert second.returncode == EXIT_CLAIMED, second.stderr
    assert f"held by pid {first.pid}" in second.stderr and "exits without writing anything" in second.stderr
    assert "Traceback" not in second.stderr
    record = json.loads(folder.result.read_text())
    assert record["attempt"] == 1 and folder.attempt_numbers() == [1]  # the second copy made no attempt
    assert not folder.claim.exists()
    assert record["key"] == StageJob("train", key, 0).key


def _claim_left_on_another_node(folder, **slurm) -> None:
    """claim.lock as a run killed on node7 leaves it: its heartbeat is seconds old."""
    folder.dir.mkdir(parents=True, exist_ok=True)
    folder.claim.write_text(json.dumps({
        "host": "node7", "pid": 31337, "purpose": "train/k/r0", "created": time.time() - 5, "heartbeat": time.time(),
        "token": "the-killed-run", **slurm,
    }))


def test_a_requeued_job_takes_over_the_claim_its_killed_run_left_on_another_node(tmp_path, monkeypatch):
    """SLURM requeues a job killed by a node failure (same job id, restart count 1) onto another
    node; the claim its first run left there still looks alive, but it is the job's own."""
    job = StageJob("train", "k" * 16, 0)
    folder = StageStore.at(tmp_path).job(job)
    _claim_left_on_another_node(folder, slurm_job_id="4242", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    claim = claim_stage(folder, job)
    try:
        holder = LockFile.read_holder(folder.claim)
        assert holder["token"] != "the-killed-run" and holder["host"] == socket.gethostname()
        assert holder["slurm_job_id"] == "4242" and holder["slurm_restart_count"] == 1
    finally:
        claim.release()
    assert not folder.claim.exists()


@pytest.mark.parametrize("theirs", [
    {"slurm_job_id": "4243", "slurm_restart_count": 0},  # another job of the same stage (a duplicate submit)
    {"slurm_job_id": "4242", "slurm_array_job_id": "4240", "slurm_array_task_id": "3"},  # another task of an array
], ids=["another-job", "another-array-task"])
def test_a_fresh_claim_of_another_slurm_job_is_not_taken_over(tmp_path, monkeypatch, theirs):
    job = StageJob("train", "k" * 16, 0)
    folder = StageStore.at(tmp_path).job(job)
    folder.dir.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with held_elsewhere(folder.claim, host="node7", **theirs), pytest.raises(StageClaimedError, match="node7"):
        claim_stage(folder, job)
    assert LockFile.read_holder(folder.claim)["token"] == "theirs"
