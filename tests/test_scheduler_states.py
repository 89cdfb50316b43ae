"""Every job state SLURM documents reads as a defined status (fake sacct/squeue/scancel on PATH);
a scheduler that does not answer is an error, never a view in which every job is gone."""

from __future__ import annotations

import getpass
import os
import stat
from datetime import datetime, timezone

import pytest

from conftest import run_cli, submitted_run
from dpr_hpc.backends import scheduler
from dpr_hpc.ledger import Ledger
from dpr_hpc.status import stage_states, summary_line

# The JOB STATE CODES of SLURM's sacct and squeue documentation, and what each must read as.
DOCUMENTED = {
    "BOOT_FAIL": "FAILED", "CANCELLED": "CANCELLED", "COMPLETED": "COMPLETED", "CONFIGURING": "RUNNING",
    "COMPLETING": "RUNNING", "DEADLINE": "FAILED", "FAILED": "FAILED", "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED", "PENDING": "PENDING", "PREEMPTED": "INTERRUPTED", "RUNNING": "RUNNING",
    "RESV_DEL_HOLD": "HELD", "REQUEUE_FED": "REQUEUED", "REQUEUE_HOLD": "HELD", "REQUEUED": "REQUEUED",
    "RESIZING": "RUNNING", "REVOKED": "RUNNING", "SIGNALING": "RUNNING", "SPECIAL_EXIT": "HELD",
    "STAGE_OUT": "RUNNING", "STOPPED": "HELD", "SUSPENDED": "HELD", "TIMEOUT": "TIMEOUT",
}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "HELD"}


def _fake(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\necho "$@" >> "$FAKE_SLURM/{name}.args"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name in ("sacct", "squeue"):
        _fake(bin_dir, name, f'cat "$FAKE_SLURM/{name}.out" 2>/dev/null; exit 0')
    _fake(bin_dir, "sbatch", "exit 1")
    _fake(bin_dir, "scancel", 'echo "scancel: error: Kill job error on job id 5: Access/permission denied" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    return bin_dir


@pytest.mark.parametrize(("state", "status"), sorted(DOCUMENTED.items()))
def test_every_documented_slurm_state_has_a_defined_status(fake_slurm, state, status):
    (fake_slurm / "sacct.out").write_text(f"5|{state}|0:0|node3|00:10:00|None\n")
    info = scheduler.query(["5"]).jobs["5"]
    assert (info.status, info.active) == (status, status in ACTIVE)


def test_the_table_covers_what_slurm_documents_and_held_states_are_not_failures():
    assert set(DOCUMENTED) <= set(scheduler.SLURM_STATES)
    for held in ("STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"):
        assert scheduler.JobInfo("1", held).active and scheduler.JobInfo("1", held).status != "FAILED"
    assert scheduler.JobInfo("1", "CANCELLED by 1234".split()[0]).status == "CANCELLED"
    assert scheduler.JobInfo("1", "SOME_FUTURE_STATE").active  # left alone, not resubmitted


@pytest.fixture
def run(data_files, tmp_path):
    layout, plan, _ = submitted_run(data_files, tmp_path, "5")
    return layout, plan


@pytest.mark.parametrize("state", ["STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"])
def test_status_shows_held_jobs_as_held_and_their_dependants_waiting(fake_slurm, run, state):
    layout, plan = run
    (fake_slurm / "sacct.out").write_text(f"5|{state}|0:0|node3|01:00:00|None\n")
    states = stage_states(layout, plan).states
    assert [s.state for s in states] == ["HELD", "PENDING", "PENDING"]
    assert summary_line(states) == "3 stage jobs: 2 PENDING, 1 HELD"


def test_sacct_and_squeue_ask_for_the_ledgers_users_from_its_first_submission(fake_slurm, run):
    layout, plan = run
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "squeue.out").write_text("5|PENDING||0:00|Priority\n")
    assert stage_states(layout, plan).states[0].state == "PENDING"
    first = Ledger.read(layout.store).first_submission()
    since = (first - scheduler.SINCE_MARGIN).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    sacct_args = (fake_slurm / "sacct.args").read_text().split()
    assert sacct_args[sacct_args.index("-S") + 1] == since and sacct_args[sacct_args.index("-u") + 1] == getpass.getuser()
    assert f"-u {getpass.getuser()}" in (fake_slurm / "squeue.args").read_text()
    assert first <= datetime.now(timezone.utc)


def test_an_unreachable_scheduler_is_an_error_not_failed_rows(fake_slurm, run, capsys):
    layout, _ = run
    _fake(fake_slurm, "sacct", 'echo "sacct: error: Problem talking to the database: Connection refused" >&2; exit 1')
    _fake(fake_slurm, "squeue", 'echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    with pytest.raises(scheduler.SchedulerUnreachableError, match="connect failure"):
        scheduler.query(["5"])
    code, out, err = run_cli(capsys, "status", layout.root)
    assert code == 0 and "FAILED" not in out and "UNKNOWN" in out
    assert "states from the store only: scheduler unreachable: sacct: sacct: error: Problem talking" in out


def test_a_failing_scancel_is_one_line(fake_slurm, run, capsys):
    layout, _ = run
    (fake_slurm / "sacct.out").write_text("5|RUNNING|0:0|node3|00:10:00|None\n")
    code, out, err = run_cli(capsys, "cancel", layout.root)
    assert code == 1 and err == "dpr-hpc: error: scancel: error: Kill job error on job id 5: Access/permission denied\n"
