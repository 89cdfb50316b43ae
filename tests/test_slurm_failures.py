"""SLURM failure paths, with fake sbatch/sacct/squeue on PATH (the real cluster is in test_slurm.py):
an sbatch that keeps failing, and accounting that is unavailable."""

from __future__ import annotations

import errno
import getpass
import json
import os

import pytest

from datetime import datetime, timedelta, timezone

from conftest import ONE_CELL_GRID, run_cli, submitted_run, write_grid
from fake_slurm import install
from dpr_hpc.backends import slurm
from dpr_hpc.tracking import slurm_queue
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.tracking.ledger import UNLISTED_GRACE_S, Ledger
from dpr_hpc.planning.plan import StageJob, make_plan
from dpr_hpc.store.bindings import save_plan
from dpr_hpc.store.paths import StageStore
from dpr_hpc.tracking.status import stage_states

FAKES = {
    # Accepts two submissions, then refuses every one as a QOS limit would. Each accepted job
    # is queued (PENDING) with the tag of its --comment.
    "sbatch": 'n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_SLURM/count"\n'
              'if [ $n -le 2 ]; then tag=$(sed -n "s/^#SBATCH --comment=//p" "${@: -1}")\n'
              '  echo "$((100+n))|PENDING||0:00|Priority|$tag" >> "$FAKE_SLURM/queue"; echo "Submitted batch job $((100+n))"; exit 0; fi\n'
              'echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1',
    "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1',
    # squeue is fake_slurm's: it prints $FAKE_SLURM/queue in the format it is asked for.
    "sacctmgr": "exit 1",
    "scontrol": "exit 1",
    "scancel": "exit 0",
}


def plan_cell_id(grid) -> str:
    return make_plan(load_grid(grid)).cells[0].cell_id


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "BACKOFF_S", 0.0)
    return install(tmp_path / "fake-slurm", monkeypatch, FAKES)


def test_sbatch_failures_are_retried_then_reported_and_earlier_jobs_stay_recorded(fake_slurm, cached_x_y, data_files, tmp_path, capsys):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert code == 1
    assert "QOSMaxSubmitJobPerUserLimit" in err and "infer/" in err and plan_cell_id(grid) in err
    assert int((fake_slurm / "count").read_text()) == 2 + slurm.SUBMIT_ATTEMPTS
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    assert {key.split("/")[0]: h[0]["job_id"] for key, h in ledger.items()} == {"train": "101", "index": "102"}


def test_status_falls_back_to_squeue_without_accounting_and_says_so(fake_slurm):
    (fake_slurm / "queue").write_text("7|PENDING||0:00|Priority|\n8|PENDING||0:00|Priority|\n9|RUNNING|n1|0:10|None|\n")
    view = slurm_queue.query(["7", "8"])
    assert view.source.startswith("squeue (sacct unavailable: sacct: error: Slurm accounting storage is disabled")
    assert {j.state for j in view.jobs.values()} == {"PENDING"} and view.jobs["7"].reason == "Priority"
    assert set(view.jobs) == {"7", "8"}  # only the jobs asked about
    assert f"-u {getpass.getuser()}" in (fake_slurm / "squeue.args").read_text()
    assert slurm_queue.submit_capacity() is None


def test_a_job_the_scheduler_no_longer_lists_is_pending_only_for_a_grace_period(fake_slurm, data_files, tmp_path):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, grid)
    train = next(plan.jobs())
    with Ledger.locked(layout.store) as ledger:
        ledger.record(train, "999")
    # The fake queue is empty, as after a job ends and squeue forgets it.
    assert stage_states(layout, plan).states[0].state == "PENDING"
    log = layout.store.ledger_file
    entry = json.loads(log.read_text())
    entry["submitted_at"] = (datetime.now(timezone.utc) - timedelta(seconds=UNLISTED_GRACE_S + 1)).isoformat()
    log.write_text(json.dumps(entry) + "\n")
    states = stage_states(layout, plan).states
    assert [s.state for s in states] == ["FAILED", "BLOCKED", "BLOCKED"]
    assert "no longer listed" in states[0].detail


@pytest.mark.parametrize("slurm_section", ["", "slurm: {defaults: {comment: my-note}}\n"], ids=["tag only", "with a user comment"])
def test_a_submit_killed_between_sbatch_and_the_ledger_is_adopted_by_the_next(fake_slurm, cached_x_y, data_files, tmp_path, monkeypatch, slurm_section):
    """The fault hook kills the submit right after its first sbatch: the job is queued but not
    recorded. The next submit finds it by its tag (before any comment of the user's) and
    records it; nothing is queued twice."""
    import subprocess
    import sys

    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n" + slurm_section)
    command = [sys.executable, "-m", "dpr_hpc", "submit", str(grid), "--backend", "slurm", "--runs-root", str(tmp_path / "runs")]
    killed = subprocess.run(command, env={**__import__("os").environ, "DPR_HPC_FAULT": "kill-after-sbatch:1"}, capture_output=True, text=True)
    assert killed.returncode == 137
    assert not (tmp_path / "runs" / "store" / "ledger.jsonl").exists()
    again = subprocess.run(command, capture_output=True, text=True)
    assert "adopting SLURM job 101" in again.stdout, again.stdout + again.stderr
    queued = [line.split("|")[0] for line in (fake_slurm / "queue").read_text().splitlines()]
    assert queued == ["101", "102"]  # train once (adopted), then its index; the infer hit the QOS limit
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    train = next(h for key, h in ledger.items() if key.startswith("train/"))
    assert [e["job_id"] for e in train] == ["101"] and train[0]["adopted"] is True
    if slurm_section:
        assert (fake_slurm / "queue").read_text().splitlines()[0].endswith(f"|dpr-hpc:{train[0]['tag']},my-note")


def test_the_tag_is_read_from_a_comment_whatever_the_user_added():
    assert slurm_queue.comment_nonce(slurm_queue.job_comment("0f3a", None)) == "0f3a"
    assert slurm_queue.comment_nonce(slurm_queue.job_comment("0f3a", "dpr-hpc:beef")) == "0f3a"
    assert slurm_queue.comment_nonce("paper dpr-hpc:0f3a") is None and slurm_queue.comment_nonce("dpr-hpc:0f3ax") is None


def test_an_unreachable_scheduler_stops_submit_and_status_says_so(fake_slurm, cached_x_y, data_files, tmp_path, capsys):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, _, _ = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    for name in ("squeue", "sacct"):
        (fake_slurm / name).write_text("#!/bin/bash\necho \"slurm_load_jobs error: Unable to contact slurm controller\" >&2; exit 1\n")
    count_before = (fake_slurm / "count").read_text()
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs", "--retry-failed")
    assert code == 1 and "scheduler unreachable" in err and "Unable to contact slurm controller" in err
    assert (fake_slurm / "count").read_text() == count_before  # nothing submitted
    code, out, err = run_cli(capsys, "status", grid, "--runs-root", tmp_path / "runs")
    assert code == 0 and "scheduler unreachable" in out
    assert "FAILED" not in out and "UNKNOWN" in out


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=["disk full", "quota exceeded"])
def test_a_ledger_write_cut_short_by_a_full_disk_stops_submit_leaves_no_cut_line_and_the_job_is_adopted_later(
        fake_slurm, cached_x_y, data_files, tmp_path, capsys, monkeypatch, error):
    """os.write writes half the line, then the disk is full: the submit stops with one line
    naming the ledger and the error, the half line is gone, and the next submit adopts the
    job sbatch queued (by its tag) instead of queueing it again."""
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    real_write = os.write
    calls: list[int] = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", half_then_full)
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    monkeypatch.setattr(os, "write", real_write)
    ledger = tmp_path / "runs" / "store" / "ledger.jsonl"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(ledger) in err and os.strerror(error) in err and "101" in err
    assert ledger.read_bytes() == b""  # the half line was cut back
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert "adopting SLURM job 101" in out, out + err
    entries = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    train = next(h for key, h in entries.items() if key.startswith("train/"))
    assert [e["job_id"] for e in train] == ["101"]  # queued once, recorded once


def test_a_damaged_line_in_the_middle_of_the_ledger_locks_no_command_out(fake_slurm, cached_x_y, data_files, tmp_path):
    """status, submit and cancel, each run as a user runs it: the damaged line is named on
    stderr and skipped, and the entries after it still count (nothing is queued twice)."""
    import subprocess
    import sys

    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, grid)
    train, index, _ = plan.jobs()
    ledger_file = layout.store.ledger_file
    with Ledger.locked(layout.store) as ledger:
        ledger.record(train, "201")
    with ledger_file.open("a") as log:
        log.write('{"job": "train/' + train.key[:6] + "\n")  # an append cut short, then a newline
    with Ledger.locked(layout.store) as ledger:
        ledger.record(index, "202")
    (fake_slurm / "queue").write_text("201|RUNNING|n1|0:10|None|\n202|PENDING||0:00|Dependency|\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dpr_hpc", *args, "--runs-root", str(tmp_path / "runs")],
                              capture_output=True, text=True)

    warning = f"{ledger_file}: line 2 is not a ledger entry; skipped"
    status = cli("status", str(grid))
    assert status.returncode == 0 and warning in status.stderr, status.stdout + status.stderr
    assert "RUNNING" in status.stdout and "FAILED" not in status.stdout
    submit = cli("submit", str(grid), "--backend", "slurm")
    assert submit.returncode == 0 and warning in submit.stderr, submit.stdout + submit.stderr
    assert "submitted as job 101 after 202" in submit.stdout and int((fake_slurm / "count").read_text()) == 1
    cancel = cli("cancel", str(grid))
    assert cancel.returncode == 0 and warning in cancel.stderr, cancel.stdout + cancel.stderr
    assert (fake_slurm / "scancel.args").read_text().split() == ["101", "201", "202"]


def test_a_record_after_a_cut_last_line_starts_a_line_of_its_own(data_files, tmp_path):
    layout, plan, train = submitted_run(data_files, tmp_path, "101")
    with layout.store.ledger_file.open("a") as log:
        log.write('{"job": "train/')  # a crash mid-append: no newline
    index = list(plan.jobs())[1]
    with Ledger.locked(layout.store) as ledger:
        ledger.record(index, "102")
    read = Ledger.read(layout.store)
    assert read.latest(train)["job_id"] == "101" and read.latest(index)["job_id"] == "102"


def test_a_job_stuck_on_a_dead_dependency_is_cancelled_and_submitted_again(cached_x_y, data_files, tmp_path, monkeypatch, capsys):
    """Training job 500 failed, and its index waits on it for ever (DependencyNeverSatisfied,
    on a cluster without kill-on-invalid-dep or a job held there by hand), its infer behind it.
    The training has since been run again and is complete. `submit` cancels the two stuck jobs
    and queues them again: the index at once, the infer after the new index."""
    from test_status import complete

    monkeypatch.setattr(slurm, "BACKOFF_S", 0.0)
    fake = install(tmp_path / "fake-slurm", monkeypatch, {
        "sbatch": 'n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_SLURM/count"\n'
                  'cp "${@: -1}" "$FAKE_SLURM/script-$((600+n))"; echo "Submitted batch job $((600+n))"',
        "scancel": "exit 0", "sacctmgr": "exit 1", "scontrol": "exit 1"})
    (fake / "sacct.out").write_text("500|FAILED|1:0|n1|00:01:00|None\n"
                                    "501|PENDING|0:0|None assigned|00:00:00|DependencyNeverSatisfied\n"
                                    "502|PENDING|0:0|None assigned|00:00:00|Dependency\n")
    grid = write_grid(data_files, ONE_CELL_GRID)
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, grid)
    train, index, infer = plan.jobs()
    with Ledger.locked(layout.store) as ledger:
        for job, job_id in ((train, "500"), (index, "501"), (infer, "502")):
            ledger.record(job, job_id)
    complete(layout, plan, train)

    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert code == 0, out + err
    assert "job 501 waited on an upstream job that ended; submitting it again" in out
    assert set((fake / "scancel.args").read_text().split()) >= {"501", "502"}
    latest = {key.split("/")[0]: history[-1]["job_id"] for key, history in Ledger.read(layout.store).entries.items()}
    assert latest == {"train": "500", "index": "601", "infer": "602"}
    assert "dependency" not in (fake / "script-601").read_text() and "afterok:601" in (fake / "script-602").read_text()
