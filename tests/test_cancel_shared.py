"""One stage job in the shared store serves every grid that plans it: which jobs of a grid
another grid under the same runs root also plans (what `cancel` keeps unless --include-shared).
The real-cluster cancel is in test_slurm's concurrent-submit test."""

from __future__ import annotations

from conftest import write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import make_plan
from dpr_hpc.store.bindings import save_plan
from dpr_hpc.store.runs import grids_sharing

GRID = """
    name: {name}
    data: {{train: train.json, dev: dev.json}}
    blocks:
      - {{name: b, encoder: x/y, embedding_sizes: [{sizes}], repeats: {{index: {repeats}}}}}
"""


def saved(data_files, name: str, sizes: str, repeats: int):
    grid = write_grid(data_files, GRID.format(name=name, sizes=sizes, repeats=repeats), f"{name}.yaml")
    plan = make_plan(load_grid(grid))
    layout = RunLayout(data_files / "runs" / name)
    save_plan(layout, plan, grid)
    return layout, plan


def jobs_of_cell(plan, size: int) -> set:
    cell = next(c.cell_id for c in plan.cells if c.embedding_size == size)
    return {job for stage in ("train", "index", "infer") for job in plan.cell_jobs(cell, stage)}


def test_jobs_another_grid_plans_are_named_with_that_grid_and_the_rest_are_not(data_files):
    a = saved(data_files, "a", "8, 16", 1)
    b = saved(data_files, "b", "8", 2)  # the size-8 cell of a, with a second index repeat
    saved(data_files, "c", "8", 1)  # the size-8 cell of a, as it is
    (data_files / "runs" / "broken").mkdir()
    (data_files / "runs" / "broken" / "plan.json").write_text("{not json")

    shared, unreadable = grids_sharing([a])
    assert {job: sorted(grids) for job, grids in shared.items() if job in set(a[1].jobs())} == {
        job: ["b", "c"] for job in jobs_of_cell(a[1], 8)}
    assert not jobs_of_cell(a[1], 16) & set(shared)
    assert len(unreadable) == 1 and "broken/plan.json: damaged" in unreadable[0]

    shared, _ = grids_sharing([a, b])  # grids acted on together never keep each other's jobs
    assert {tuple(grids) for grids in shared.values()} == {("c",)} and len(shared) == len(jobs_of_cell(a[1], 8))
