"""A run folder's record of its grid: which grid file it belongs to (grid.json), the plan last
submitted (plan.json, with each job's spec written into the store), every cell ever planned
here (cells.json) and the hub models' commits (models.json). Status, collect and submit read
them; a second grid file with the same name is refused here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from dpr_hpc.errors import GridError, UsageError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.provenance import now_iso
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.store.markers import read_marker
from dpr_hpc.store.paths import StageSpec
from dpr_hpc.store.records import Records


def check_binding(layout: RunLayout, grid_file: Path) -> dict[str, Any] | None:
    """A run folder belongs to one grid file: a second file with the same `name:` would
    overwrite the first one's plan and hide its cells, so it is refused (exit 2)."""
    grid_file = Path(grid_file).resolve()
    bound = read_marker(layout.grid_binding)
    if bound and bound.get("grid_file") != str(grid_file):
        raise GridError(str(grid_file), "name", f"the run folder {layout.root} belongs to another grid file, {bound.get('grid_file')}; "
                        "give this grid another name (or pass another --runs-root)")
    return bound


def bind_grid(layout: RunLayout, grid_file: Path) -> None:
    """Bind the run folder to `grid_file` on its first submit; refuse any other file later."""
    grid_file = Path(grid_file).resolve()
    if not check_binding(layout, grid_file):
        write_json_atomic(layout.grid_binding, {"grid_file": str(grid_file), "bound_at": now_iso()})


def save_plan(layout: RunLayout, plan: Plan, grid_file: Path) -> None:
    """Record the plan, add its cells to the run's history, and write each job's spec into
    the store, where the job reads the settings it runs with."""
    from dpr_hpc.inputs.hub import revision_for

    bind_grid(layout, grid_file)
    store = layout.store
    pins = store.hub_pins()
    as_json = {cell.cell_id: cell.to_json() for cell in plan.cells}
    for job in plan.jobs():
        if job.repeat == 0:
            cell = plan.spec_cell(job)
            revisions = {model: revision for model in cell.hub_models if (revision := revision_for(model, pins))}
            store.write_spec(StageSpec(job.stage, job.key, as_json[cell.cell_id], plan.upstream_keys(job), revisions, plan.slot(job)))
    history = cell_history(layout)
    stamp = now_iso()
    for cell in plan.cells:
        entry = history.get(cell.cell_id, {"first_planned": stamp})
        history[cell.cell_id] = {**entry, "keys": plan.keys[cell.cell_id], "repeats": cell.repeats.__dict__, "last_planned": stamp}
    write_json_atomic(layout.cells_history, history)
    write_json_atomic(layout.plan_file, {**plan.to_json(), "grid_file": str(Path(grid_file).resolve()), "saved_at": stamp})


def record_hub_models(layout: RunLayout, models: Iterable[str]) -> dict[str, str | None]:
    """Write models.json: each hub model with the commit the grid's jobs load (its pin), and
    the cache it is in."""
    from dpr_hpc.inputs.hub import hub_cache_dir, revision_for

    pins = layout.store.hub_pins()
    revisions = {model: revision_for(model, pins) for model in sorted(set(models))}
    write_json_atomic(layout.hub_models, {"hub_cache": str(hub_cache_dir().resolve()), "models": revisions, "recorded_at": now_iso()})
    return revisions


def load_plan(layout: RunLayout) -> Plan:
    if not layout.plan_file.is_file():
        raise UsageError(f"{layout.root}: no plan.json here; run 'dpr-hpc submit GRID' first")
    try:
        return Plan.from_json(read_json(layout.plan_file))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{layout.plan_file}: damaged ({type(exc).__name__}: {exc}); 'dpr-hpc submit GRID' writes it again") from None


def cell_history(layout: RunLayout) -> dict[str, Any]:
    try:
        return dict(read_json(layout.cells_history))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{layout.cells_history}: cannot be read ({exc})") from None


def superseded(history: dict[str, Any], plan: Plan, job: StageJob, records: Records) -> str | None:
    """Why a job with no record of its own replaces one an earlier plan of the same cell had:
    the cell's stage key changed because an input's content changed (an edited dev file), so
    the earlier record is stale, and the job is its rerun. None when there is no such record."""
    for cell_id in plan.users(job):
        old_key = history.get(cell_id, {}).get("keys", {}).get(job.stage)
        if not old_key or old_key == job.key:
            continue
        old = records.check(StageJob(job.stage, old_key, job.repeat))
        if old.state != "missing":
            why = old.reason if old.state != "complete" else "its inputs changed since it ran"
            return f"replaces the record of key {old_key[:8]} ({old.state}: {why})"
    return None
