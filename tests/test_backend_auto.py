"""`submit --backend auto` (the default): slurm where sbatch is on PATH, the local backend elsewhere."""

from __future__ import annotations

import stat

from conftest import one_cell_run, run_cli
from test_status import complete


def complete_run(data_files, tmp_path):
    """A one-cell run whose three stage jobs are complete: a submit has nothing to run."""
    layout, plan, _ = one_cell_run(data_files, tmp_path)
    for job in plan.jobs():
        complete(layout, plan, job)
    return layout, data_files / "grid.yaml"


def test_auto_without_sbatch_on_path_runs_the_local_backend(cached_x_y, data_files, tmp_path, monkeypatch, capsys):
    layout, grid = complete_run(data_files, tmp_path)
    empty = tmp_path / "no-slurm"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, out, err = run_cli(capsys, "submit", grid, "--runs-root", layout.runs_root)
    assert code == 0, out + err
    assert f"-> {layout.root} (local)" in out and "local: 0 ran, 3 already complete" in out


def test_auto_with_sbatch_on_path_submits_to_slurm(cached_x_y, data_files, tmp_path, monkeypatch, capsys):
    layout, grid = complete_run(data_files, tmp_path)
    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    for name in ("sbatch", "squeue", "sacct", "scontrol", "sacctmgr"):
        (fake / name).write_text(f'#!/bin/bash\necho "$@" >> "{fake}/{name}.args"\n' + ("exit 1\n" if name == "sbatch" else "exit 0\n"))
        (fake / name).chmod((fake / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake))
    code, out, err = run_cli(capsys, "submit", grid, "--runs-root", layout.runs_root)
    assert code == 0, out + err
    assert f"-> {layout.root} (slurm)" in out and "slurm: 0 submitted, 3 already complete" in out
    assert not (fake / "sbatch.args").exists()  # nothing to queue
