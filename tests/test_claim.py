"""One writer per stage job: two copies started at once, exactly one runs; a claim left by an
earlier run of the same SLURM job is its own; a copy whose claim was taken stops writing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import held_elsewhere, run_folder, train_folder
from dpr_hpc.store.claims import claim_stage
from dpr_hpc.errors import StageClaimedError
from dpr_hpc.locks import LockFile
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.resume.signals import HOLD_ENV, PARKED_SUFFIX
from dpr_hpc.store.bindings import load_plan
from dpr_hpc.stages.runner import EXIT_CLAIMED
from dpr_hpc.store.paths import StageStore

RUN_ONE = "import sys; from dpr_hpc.stages.runner import run_stage_job; run_stage_job(sys.argv[1], 'train', sys.argv[2], 0)"


def _start_parked(command: list[str], hold) -> subprocess.Popen:
    """Start a training job that stops at its first step boundary while `hold` exists (the
    DPR_HPC_HOLD_TRAINING hook), and return once it stands there: it holds its claim, and
    cannot end, nor write a checkpoint, until the test removes `hold`."""
    hold.touch()
    parked = hold.with_name(hold.name + PARKED_SUFFIX)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, HOLD_ENV: str(hold)})
    deadline = time.monotonic() + 300
    while not parked.exists():  # wait on the state, not on a sleep
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            out, err = job.communicate()
            pytest.fail(f"the training never reached its first step boundary:\n{out}{err}")
        time.sleep(0.05)
    return job


@pytest.mark.slow
def test_two_copies_of_a_stage_job_one_runs_and_the_other_exits_naming_it(demo_assets, tmp_path):
    layout, cell_id = run_folder(tmp_path, demo_assets, "twice")
    key = load_plan(layout).keys[cell_id]["train"]
    folder = train_folder(layout, cell_id)
    command = [sys.executable, "-c", RUN_ONE, str(layout.runs_root), key]
    first = _start_parked(command, tmp_path / "hold")
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "hold").unlink()  # the first copy trains on only now
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert second.returncode == EXIT_CLAIMED, second.stderr
    assert f"held by pid {first.pid}" in second.stderr and "exits without writing anything" in second.stderr
    assert "Traceback" not in second.stderr
    record = json.loads(folder.result.read_text())
    assert record["attempt"] == 1 and folder.attempt_numbers() == [1]  # the second copy made no attempt
    assert not folder.claim.exists()
    assert record["key"] == StageJob("train", key, 0).key


def _files(folder) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_copy_whose_claim_was_taken_while_it_trained_exits_4_and_writes_nothing_more(demo_assets, tmp_path):
    """Its heartbeat lapsed while it lived (an NFS failover, a suspended job), another copy
    judged it dead and took the claim: at its next checkpoint it finds the token is not its
    own, and stops without writing a checkpoint, a failure marker or a record."""
    layout, cell_id = run_folder(tmp_path, demo_assets, "stolen", every=1)  # a checkpoint at every step
    key = load_plan(layout).keys[cell_id]["train"]
    folder = train_folder(layout, cell_id)
    first = _start_parked([sys.executable, "-c", RUN_ONE, str(layout.runs_root), key], tmp_path / "hold")
    try:
        taken = {**LockFile.read_holder(folder.claim), "host": "node9", "pid": 99, "token": "the-other-copy", "heartbeat": time.time()}
        folder.claim.write_text(json.dumps(taken))
        before = _files(folder.dir)
    finally:
        (tmp_path / "hold").unlink()
    out, err = first.communicate(timeout=600)
    assert first.returncode == EXIT_CLAIMED, out + err
    assert "its claim was taken over while it ran" in err and "node9" in err and "writes nothing more" in err
    assert "Traceback" not in err
    assert _files(folder.dir) == before  # not one file written, changed or removed since
    assert not list(folder.dir.rglob("step-*.pt")) and not list(folder.dir.rglob("record.json")) and not folder.result.exists()
    assert LockFile.read_holder(folder.claim)["token"] == "the-other-copy"  # its release left the new claim alone


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


def _steal(claim_file) -> None:
    """Another copy judged this claim's heartbeat dead and took it: a new token in claim.lock."""
    claim_file.write_text(json.dumps({**LockFile.read_holder(claim_file), "host": "node9", "token": "the-other-copy"}))


def test_a_lost_claim_stops_the_next_index_shard_and_the_record_before_they_are_written(demo_assets, tmp_path):
    import torch

    from dpr_hpc.errors import ClaimLostError
    from dpr_hpc.inputs.data import Passage
    from dpr_hpc.modeling.batching import tokenize_passages
    from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer
    from dpr_hpc.modeling.encoding import encode
    from dpr_hpc.store.records import write_record

    job = StageJob("index", "k" * 16, 0)
    folder = StageStore.at(tmp_path).job(job)
    folder.dir.mkdir(parents=True)
    claim = claim_stage(folder, job)
    attempt = folder.working_attempt(None)
    model = str(demo_assets / "models" / "tiny-bert")
    tokenizer = load_tokenizer(model)
    texts = tokenize_passages(tokenizer, [Passage(str(i), "t", "word " * (1 + i)) for i in range(12)], 64, embed_title=True)
    checks = []

    def check_then_lose_after_the_first_shard() -> None:
        checks.append(len(checks))
        if len(checks) == 2:
            _steal(folder.claim)
        claim.check()

    with pytest.raises(ClaimLostError, match="taken over while it ran.*node9"):
        encode(DprEncoder.from_pretrained(model, 16), texts, tokenizer.pad_token_id, 4, torch.device("cpu"),
               shard_dir=attempt.shards, shard_rows=4, before_shard=check_then_lose_after_the_first_shard)
    assert sorted(p.name for p in attempt.shards.glob("shard-*.npy")) == ["shard-00000.npy"]  # the one written before
    with pytest.raises(ClaimLostError):
        write_record(folder, attempt, {"stage": "index"}, before_each=claim.check)
    assert not attempt.record.exists() and not folder.result.exists()
    claim.release()
    assert LockFile.read_holder(folder.claim)["token"] == "the-other-copy"


def _sacct_says(monkeypatch, line: str) -> list[list[str]]:
    """SLURM here, and sacct answering with `line` (unit test of the runner's question)."""
    from dpr_hpc.tracking import slurm_queue

    asked: list[list[str]] = []
    monkeypatch.setattr(slurm_queue, "slurm_available", lambda: True)
    monkeypatch.setattr(slurm_queue, "_run", lambda command: asked.append(command) or line + "\n")
    return asked


def test_a_claim_left_by_an_array_task_slurm_lists_as_ended_is_taken_at_once_on_another_node(tmp_path, monkeypatch):
    """A shard task killed on node7 (scancel) leaves its claim; once it has missed two beats, its
    rerun, another SLURM job on this node, asks the scheduler, which lists the holder CANCELLED: the
    claim is taken at once instead of after 600 s of watching a heartbeat that will never beat again."""
    from dpr_hpc.stages.runner import slurm_job_ended

    job = StageJob("encode-shard", "k" * 16, 0)
    folder = StageStore.at(tmp_path).job(job)
    _claim_left_on_another_node(folder, slurm_job_id="190", slurm_array_job_id="187", slurm_array_task_id="3",
                                heartbeat=time.time() - 150)  # silent for two beats and more, not yet stale (600 s)
    monkeypatch.setenv("SLURM_JOB_ID", "192")
    asked = _sacct_says(monkeypatch, "190|CANCELLED by 0|0:9|node7|00:00:05|None|187_3")
    began = time.monotonic()
    claim = claim_stage(folder, job, holder_ended=slurm_job_ended)
    try:
        assert time.monotonic() - began < 5
        assert LockFile.read_holder(folder.claim)["host"] == socket.gethostname()
    finally:
        claim.release()
    assert any("-j" in command and "187" in command for command in asked)  # the array asked for by its id


def test_a_claim_whose_slurm_job_still_runs_is_not_taken(tmp_path, monkeypatch):
    from dpr_hpc.stages.runner import slurm_job_ended

    job = StageJob("encode-shard", "k" * 16, 0)
    folder = StageStore.at(tmp_path).job(job)
    folder.dir.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "192")
    _sacct_says(monkeypatch, "190|RUNNING|0:0|node7|00:01:05|None|187_3")
    holder = {"slurm_job_id": "190", "slurm_array_job_id": "187", "slurm_array_task_id": "3"}
    assert slurm_job_ended({**holder, "host": "node7"}) is False
    with held_elsewhere(folder.claim, host="node7", **holder), pytest.raises(StageClaimedError, match="node7"):
        claim_stage(folder, job, holder_ended=slurm_job_ended)


def test_no_slurm_or_no_answer_leaves_the_claim_to_its_heartbeat(monkeypatch):
    from dpr_hpc.errors import SchedulerError
    from dpr_hpc.stages.runner import slurm_job_ended
    from dpr_hpc.tracking import slurm_queue

    holder = {"slurm_job_id": "190", "host": "node7"}
    monkeypatch.setattr(slurm_queue, "slurm_available", lambda: False)
    assert slurm_job_ended(holder) is False
    monkeypatch.setattr(slurm_queue, "slurm_available", lambda: True)

    def unreachable(command):
        raise SchedulerError("sacct: Unable to contact slurm controller")

    monkeypatch.setattr(slurm_queue, "_run", unreachable)
    assert slurm_job_ended(holder) is False
    assert slurm_job_ended({"host": "node7"}) is False  # a local job's claim names no SLURM job
