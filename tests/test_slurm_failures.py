"""SLURM failure paths, with fake sbatch/sacct/squeue on PATH (the real cluster is in test_slurm.py):
an sbatch that keeps failing, and accounting that is unavailable."""

from __future__ import annotations

import getpass
import json
import stat

import pytest

from datetime import datetime, timedelta, timezone

from conftest import run_cli, submitted_run, write_grid
from dpr_hpc.backends import scheduler, slurm
from dpr_hpc.fsutil import write_json_atomic
from dpr_hpc.ledger import UNLISTED_GRACE_S, Ledger
from dpr_hpc.status import stage_states

FAKES = {
    "srun": "exit 0",
    # Accepts two submissions, then refuses every one as a QOS limit would.
    "sbatch": 'n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_SLURM/count"\n'
              'if [ $n -le 2 ]; then echo "Submitted batch job $((100+n))"; exit 0; fi\n'
              'echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1',
    "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1',
    # Lists what the test put in squeue.out, and keeps the arguments it was called with.
    "squeue": 'echo "$@" >> "$FAKE_SLURM/squeue.args"; cat "$FAKE_SLURM/squeue.out" 2>/dev/null; exit 0',
    "sacctmgr": "exit 1",
    "scontrol": "exit 1",
    "scancel": "exit 0",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    monkeypatch.setattr(slurm, "BACKOFF_S", 0.0)
    return bin_dir


def test_sbatch_failures_are_retried_then_reported_and_earlier_jobs_stay_recorded(fake_slurm, data_files, tmp_path, capsys):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert code == 1
    assert "QOSMaxSubmitJobPerUserLimit" in err and "g" in err and "infer/r0" in err
    assert int((fake_slurm / "count").read_text()) == 2 + slurm.SUBMIT_ATTEMPTS
    ledger = json.loads((tmp_path / "runs" / "g" / "ledger.json").read_text())
    assert {key.split("/", 1)[1]: h[0]["job_id"] for key, h in ledger.items()} == {"train/r0": "101", "index/r0": "102"}


def test_status_falls_back_to_squeue_without_accounting_and_says_so(fake_slurm):
    (fake_slurm / "squeue.out").write_text("7|PENDING||0:00|Priority\n8|PENDING||0:00|Priority\n9|RUNNING|n1|1:00|None\n")
    view = scheduler.query(["7", "8"])
    assert view.source.startswith("squeue (sacct unavailable: sacct: error: Slurm accounting storage is disabled")
    assert {j.state for j in view.jobs.values()} == {"PENDING"} and view.jobs["7"].reason == "Priority"
    assert set(view.jobs) == {"7", "8"}
    assert f"-u {getpass.getuser()}" in (fake_slurm / "squeue.args").read_text()
    assert scheduler.submit_capacity() is None


def test_a_job_the_scheduler_no_longer_lists_is_pending_only_for_a_grace_period(fake_slurm, data_files, tmp_path):
    layout, plan, train = submitted_run(data_files, tmp_path, "999")
    (fake_slurm / "squeue.out").write_text("")  # lists none, as after a job ends
    assert stage_states(layout, plan).states[0].state == "PENDING"
    entries = Ledger.read(layout)
    entries.entries[train.key][-1]["submitted_at"] = (datetime.now(timezone.utc) - timedelta(seconds=UNLISTED_GRACE_S + 1)).isoformat()
    write_json_atomic(entries.path, entries.entries)
    states = stage_states(layout, plan).states
    assert [s.state for s in states] == ["FAILED", "BLOCKED", "BLOCKED"]
    assert "no longer listed" in states[0].detail
