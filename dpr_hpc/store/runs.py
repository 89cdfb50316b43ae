"""What a run folder records besides results: which grid it belongs to, the plan, the cells
that were ever planned, and the markers a stage job leaves in its attempt when it fails or
stops. Status reads these; a job reads its settings from the store's spec."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterable

from dpr_hpc.errors import GridError, UsageError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.provenance import now_iso
from dpr_hpc.store.records import Records
from dpr_hpc.store.paths import AttemptPaths, JobFolder, StageSpec


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


def mark_failed(paths: AttemptPaths, error: BaseException) -> None:
    write_json_atomic(paths.failure, {"error": f"{type(error).__name__}: {error}", "finished_at": now_iso(), "host": socket.gethostname()})


def mark_interrupted(paths: AttemptPaths, reason: str) -> None:
    """Stopped by a signal after writing a checkpoint: not a failure, the next job resumes it."""
    write_json_atomic(paths.interrupted, {"reason": reason, "finished_at": now_iso(), "host": socket.gethostname()})


def resumable(folder: JobFolder) -> bool:
    """Stopped by a signal (time limit with its requeues spent, scancel) after saving its state,
    and not failed: submitting it again continues it rather than repeating a failure."""
    attempt = folder.latest_attempt()
    return attempt is not None and attempt.interrupted.exists() and not attempt.failure.exists() and not attempt.record.exists()


def latest_log(folder: JobFolder) -> Path | None:
    """The newest job log (submitit names them <job id>_<task>_log.{out,err})."""
    logs = sorted(folder.jobs.glob("*_log.err"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None


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
