"""The Python API (`import dpr_hpc`), used as a notebook uses it: no command line, no argparse.
It runs the steps `dpr-hpc` runs (binding, pins, checkpoint checks) because the command is
built on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_grid

STATUS_COLUMNS = ["cell_id", "stage", "key", "repeat", "attempt", "state", "node", "job_id", "detail"]


def demo_checkout(folder: Path, demo_assets: Path | None = None) -> Path:
    """jobs/demo.yaml as a checkout has it, with the demo's data beside it where given (as `make
    demo`'s generate-demo leaves it)."""
    (folder / "jobs").mkdir(parents=True)
    (folder / "jobs" / "demo.yaml").write_text((REPO / "jobs" / "demo.yaml").read_text())
    if demo_assets is not None:
        (folder / "data").mkdir()
        (folder / "data" / "demo").symlink_to(demo_assets)
    return folder / "jobs" / "demo.yaml"


def test_import_dpr_hpc_stays_cheap_and_names_the_api():
    """A stage job and every command import dpr_hpc: torch, pandas and transformers come only
    with a function that needs them."""
    code = ("import sys, dpr_hpc; fns = [dpr_hpc.plan, dpr_hpc.submit, dpr_hpc.status, dpr_hpc.cancel, dpr_hpc.load_results, "
            "dpr_hpc.report]; print(sorted(m for m in ('torch', 'pandas', 'transformers', 'numpy', 'submitit') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_plan_of_the_demo_grid_has_cells_with_ids_and_stage_jobs(tmp_path):
    import dpr_hpc

    plan = dpr_hpc.plan(demo_checkout(tmp_path), runs_root=tmp_path / "runs")
    assert len(plan.cells) == 12 and all(cell.cell_id for cell in plan.cells)
    assert len(plan.jobs) == 38 and {job.stage for job in plan.jobs} == {"train", "index", "infer"}
    assert not plan.existing and plan.notes.missing_data  # nothing generated yet: the data is named, nothing is run
    assert not (tmp_path / "runs").exists()  # plan writes nothing


def test_a_python_submit_refuses_what_the_command_refuses(cached_x_y, data_files, tmp_path):
    """The run folder's binding to its grid file holds for Python callers too."""
    import dpr_hpc
    from dpr_hpc.errors import GridError

    runs = tmp_path / "runs"
    first = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    other = write_grid(data_files, first.read_text(), "other.yaml")
    report = dpr_hpc.submit(first, backend="slurm", dry_run=True, runs_root=runs)
    assert report.scripts and not report.ran and not (runs / "g").exists()  # a dry run writes nothing
    pinned = dpr_hpc.prefetch(first, runs_root=runs)  # binds the run folder g to grid.yaml, as a submit does
    assert list(pinned.revisions) == ["x/y"]
    with pytest.raises(GridError, match="belongs to another grid file"):
        dpr_hpc.submit(other, backend="local", runs_root=runs)


@pytest.mark.slow
def test_a_notebook_plans_the_demo_submits_one_cell_locally_reads_status_and_results(demo_assets, tmp_path):
    """The notebook path end to end, without the CLI: plan the demo grid, submit one selected
    cell (the untrained baseline: an index and an infer job, no training) with the local
    backend, read status as a DataFrame, and load the results."""
    import dpr_hpc

    grid = demo_checkout(tmp_path / "checkout", demo_assets)
    runs = tmp_path / "runs"
    plan = dpr_hpc.plan(grid, runs_root=runs)
    cell = next(c.cell_id for c in plan.cells if c.group == "untrained-baseline")
    lines: list[str] = []

    report = dpr_hpc.submit(grid, backend="local", cells=cell, runs_root=runs, progress=lines.append)

    assert report.ok and len(report.ran) == 2 and not report.failed and report.backend == "local"
    assert any(line.startswith("grid demo: 12 cells, 38 stage jobs (2 selected") for line in lines)
    status = dpr_hpc.status(grid, runs_root=runs)
    assert list(status.columns)[:9] == STATUS_COLUMNS
    assert len(status) == sum(len(plan.plan.cell_jobs(c.cell_id, s)) for c in plan.cells for s in c.stages)  # one row per cell x stage job
    mine = status[status.cell_id == cell]
    assert list(mine.stage) == ["index", "infer"] and set(mine.state) == {"COMPLETED"} and set(mine.attempt) == {1}
    assert set(status[status.cell_id != cell].state) == {"PENDING"}  # no other cell ran
    results = dpr_hpc.load_results(grid, runs_root=runs)
    assert set(results.cell_id) == {c.cell_id for c in plan.cells}  # every cell has its row; only the one run has figures
    assert list(results[results["acc@100"].notna()].cell_id) == [cell] and results.loc[results.cell_id == cell, "pei_s"].notna().all()
