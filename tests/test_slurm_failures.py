"""SLURM failure paths, with fake sbatch/sacct/squeue on PATH (the real cluster is in test_slurm.py):
an sbatch that keeps failing, and accounting that is unavailable."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conftest import run_cli, write_grid
from dpr_hpc.backends import scheduler, slurm

FAKES = {
    "srun": "exit 0",
    # Accepts two submissions, then refuses every one as a QOS limit would.
    "sbatch": 'n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_SLURM/count"\n'
              'if [ $n -le 2 ]; then echo "Submitted batch job $((100+n))"; exit 0; fi\n'
              'echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1',
    "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1',
    "squeue": 'for id in $(echo "$3" | tr , " "); do echo "$id|PENDING||0:00|Priority"; done',
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
    view = scheduler.query(["7", "8"])
    assert view.source.startswith("squeue (sacct unavailable: sacct: error: Slurm accounting storage is disabled")
    assert {j.state for j in view.jobs.values()} == {"PENDING"} and view.jobs["7"].reason == "Priority"
    assert scheduler.submit_capacity() is None
