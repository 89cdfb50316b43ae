"""`index.keep`: which index repeats keep their FAISS file (infer searches repeat 0's)."""

from __future__ import annotations

import json

import pytest

from conftest import write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import make_plan
from dpr_hpc.store.records import Records
from dpr_hpc.store.bindings import save_plan
from dpr_hpc.stages.runner import run_stage_job


@pytest.mark.parametrize("keep", ["all", "first"])
def test_index_keep_all_keeps_every_repeats_index_file_and_first_only_repeat_0s(demo_assets, tmp_path, keep):
    """Two index repeats of the untrained tiny BERT, run by the stage runner as a job runs them."""
    grid = write_grid(tmp_path, f"""
        name: keep
        data: {{train: {demo_assets}/train.json, dev: {demo_assets}/dev.json}}
        defaults: {{text: {{max_length: 32}}, index: {{type: flat, keep: {keep}}}}}
        blocks:
          - name: b
            encoder: {demo_assets}/models/tiny-bert
            evaluate_only: true
            cells: [{{embedding_size: 16, repeats: {{index: 2}}}}]
    """)
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "keep")
    save_plan(layout, plan, grid)
    repeats = plan.cell_jobs(plan.cells[0].cell_id, "index")
    for job in repeats:
        run_stage_job(str(layout.runs_root), "index", job.key, job.repeat)
    records = Records(layout.store)
    for job in repeats:
        check = records.check(job)
        kept = keep == "all" or job.repeat == 0
        assert check.complete, check.reason
        assert check.record["details"]["index_file_kept"] is kept
        assert ("index.faiss" in check.record["artifacts"]) is kept
        assert layout.store.job(job).attempt(check.record["attempt"]).index_file.is_file() is kept
