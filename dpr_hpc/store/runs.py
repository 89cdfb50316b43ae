"""The runs a command acts on, found on disk: a grid file as it is now, a run folder given
directly, or every run under a runs root; and which stage jobs other runs there plan too."""

from __future__ import annotations

from pathlib import Path

from dpr_hpc.errors import UsageError
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.store.bindings import check_binding, load_plan
from dpr_hpc.store.layout import RunLayout


def grids_sharing(runs: list[tuple[RunLayout, Plan]]) -> tuple[dict[StageJob, list[str]], list[str]]:
    """The stage jobs of `runs` that other runs under the same runs roots plan too, with those
    grids' names, and the run folders whose plan could not be read. One stage job in the shared
    store serves every grid that plans it, so cancelling it for one grid takes it from them all."""
    acting = {layout.root.resolve() for layout, _ in runs}
    users: dict[StageJob, list[str]] = {}
    unreadable: list[str] = []
    for runs_root in sorted({layout.runs_root for layout, _ in runs}):
        for plan_file in sorted(runs_root.glob("*/plan.json")):
            if plan_file.parent.resolve() in acting:
                continue
            try:
                other = load_plan(RunLayout(plan_file.parent.resolve()))
            except UsageError as exc:
                unreadable.append(str(exc))
                continue
            for job in other.jobs():
                users.setdefault(job, []).append(other.grid_name)
    return users, unreadable


def runs_for(target: "str | Path | None", runs_root: Path) -> list[tuple[RunLayout, Plan]]:
    """What status, collect and cancel act on, with its plan: a grid file as it is now (its
    current cells and keys), a run folder given directly, or every run under the runs root (as
    last submitted)."""
    if target is None:
        found = sorted(p.parent for p in Path(runs_root).glob("*/plan.json"))
        if not found:
            raise UsageError(f"no runs under {runs_root}; run 'dpr-hpc submit GRID' first or name a run folder")
        return [(layout, load_plan(layout)) for layout in (RunLayout(p.resolve()) for p in found)]
    path = Path(target)
    if path.is_file():
        from dpr_hpc.grid import load_grid
        from dpr_hpc.planning.plan import make_plan

        grid = load_grid(path, require_data=False)
        layout = RunLayout.for_grid(grid.name, runs_root)
        check_binding(layout, path)
        return [(layout, make_plan(grid, layout.store.content_hashes() if layout.store.root.is_dir() else None))]
    if (path / "plan.json").is_file():
        layout = RunLayout(path.resolve())
        return [(layout, load_plan(layout))]
    raise UsageError(f"{target}: neither a grid file nor a run folder with plan.json")
