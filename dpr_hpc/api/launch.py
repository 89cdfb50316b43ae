"""plan, submit and prefetch: the ordered steps that turn a grid file into stage jobs, the same
for `dpr-hpc` and for a Python caller. A submit checks the run folder's grid binding, fetches
and pins the hub models a grid names, checks every checkpoint's weights, binds the grid, makes
the plan, picks the jobs and hands them to a backend; skipping one of those steps in a notebook
would run jobs the command would have refused."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpr_hpc.backends.submit_report import SubmitReport as BackendReport
from dpr_hpc.errors import GridError, UsageError
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.store.layout import RunLayout, runs_root_or_default

from dpr_hpc.api.common import Names, Progress, quiet, selection_of
from dpr_hpc.api.targets import pick_targets

if TYPE_CHECKING:
    from dpr_hpc.grid import CellConfig, Grid

BACKENDS = ("auto", "local", "slurm")


@dataclass(frozen=True)
class GridNotes:
    """What a grid needs that is not here yet: data files and hub models absent from the local
    cache. plan and a dry run say so and go on; a submit stops on them (or fetches the models)."""

    grid_path: Path
    missing_data: tuple[str, ...]
    uncached_models: tuple[str, ...]
    hub_cache: Path


@dataclass(frozen=True)
class PlanReport:
    """A grid's plan, as `dpr-hpc plan` shows it: its cells (each with `.cell_id`), its stage
    jobs, the jobs whose output is already in the store, and what is missing here."""

    plan: Plan
    run_dir: Path
    existing: frozenset[StageJob]
    notes: GridNotes

    @property
    def name(self) -> str:
        return self.plan.grid_name

    @property
    def cells(self) -> "tuple[CellConfig, ...]":
        return self.plan.cells

    @property
    def jobs(self) -> tuple[StageJob, ...]:
        """Every stage job once, each after the jobs it depends on."""
        return tuple(self.plan.jobs())

    def users(self, job: StageJob) -> list[str]:
        """The cells whose tables this job's output feeds."""
        return self.plan.users(job)

    def to_json(self) -> dict[str, Any]:
        as_json = self.plan.to_json()
        jobs = [{**job, "exists": StageJob(job["stage"], job["key"], job["repeat"]) in self.existing} for job in as_json["jobs"]]
        return {**as_json, "jobs": jobs, "missing_data": list(self.notes.missing_data)}


@dataclass
class SubmitReport(BackendReport):
    """What a submit did, job by job (the backend's report), with the run it acted on. A dry
    run fills `scripts` (each job, its first cell and the sbatch script) and runs nothing."""

    grid: str = ""
    run_dir: Path | None = None
    backend: str = ""
    turned_stale: tuple[StageJob, ...] = ()  # outside the selection, reading a forced job's output
    scripts: list[tuple[StageJob, str, str]] = field(default_factory=list)
    notes: GridNotes | None = None  # a dry run's: what is not here yet


def plan(grid: "str | Path", *, runs_root: "str | Path | None" = None) -> PlanReport:
    """Expand a grid file into cells and stage jobs; nothing runs and nothing is written. Every
    checkpoint here is loaded as its stage will load it, so a bad weight shows now."""
    from dpr_hpc.grid import load_grid
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.records import Records

    loaded = load_grid(grid, require_data=False)
    check_checkpoints(loaded)
    layout = RunLayout.for_grid(loaded.name, runs_root_or_default(runs_root))
    store = layout.store
    hashes = store.content_hashes() if store.root.is_dir() else None
    planned = make_plan(loaded, hashes)
    records = Records(store, hashes, planned)
    existing = frozenset(job for job in planned.jobs() if store.root.is_dir() and records.check(job).complete)
    return PlanReport(planned, layout.root, existing, grid_notes(loaded))


def submit(
    grid: "str | Path", *, backend: str = "auto", cells: Names = None, groups: Names = None, stages: Names = None,
    force: bool = False, force_all: bool = False, dry_run: bool = False, runs_root: "str | Path | None" = None,
    profile: "str | Path | None" = None, hold: bool = False, retry_failed: bool = False,
    time_limit_min: float | None = None, signal_delay_s: int | None = None,
    exclude_node: str | None = None, nodelist: str | None = None, progress: Progress = quiet,
) -> SubmitReport:
    """Run every stage job of the grid (or of the selected cells, groups and stages, with the
    upstream jobs they need) that is not complete. backend: "local" runs them here, one after
    another, and returns when they are done; "slurm" queues them and returns; "auto" picks
    slurm where sbatch is on PATH. `force` reruns the selected complete jobs as new attempts."""
    from dpr_hpc.backends.profile import grid_resources
    from dpr_hpc.grid import load_grid
    from dpr_hpc.grid.resources import with_nodes
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.bindings import bind_grid, check_binding
    from dpr_hpc.inputs.hub import uncached
    from dpr_hpc.tracking import slurm_queue

    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "slurm" if dry_run or slurm_queue.slurm_available() else "local"
    if backend == "local" and (profile or hold or dry_run or retry_failed or exclude_node or nodelist):
        raise UsageError("--profile, --hold, --dry-run, --retry-failed, --exclude-node and --nodelist apply to the slurm backend only")
    if backend == "slurm" and (time_limit_min is not None or signal_delay_s is not None):
        raise UsageError("--time-limit and --signal-delay apply to the local backend only; on SLURM set time and signal_delay_s in the profile")
    selection = selection_of(cells, groups, stages)
    if force and selection.everything:
        raise UsageError("--force reruns complete jobs: pick them with --cell, --group or --stage, or pass --force-all to rerun the whole grid")
    loaded = load_grid(grid, require_data=not dry_run)
    if not dry_run:
        from dpr_hpc.inputs.sources import grid_values, verify_all

        verify_all(grid_values(loaded))  # a named source changed since prefetch verified it is refused here
    check_checkpoints(loaded)
    resources = with_nodes(grid_resources(loaded, Path(profile) if profile else None), exclude_node, nodelist, ("--exclude-node", "--nodelist"))
    layout = RunLayout.for_grid(loaded.name, runs_root_or_default(runs_root))
    if dry_run:
        return _dry_run(loaded, layout, resources, selection, force, force_all, progress)
    if backend == "slurm" and not slurm_queue.slurm_available():
        raise UsageError("--backend slurm: no sbatch on PATH here")
    limits = local_limits(time_limit_min, signal_delay_s) if backend == "local" else {}
    check_binding(layout, grid)
    was_missing = uncached(model for cell in loaded.cells for model in cell.hub_models)
    fetch_hub_models(loaded, layout, update=False, progress=progress)  # before the plan: a stage key names each model's pinned commit
    if was_missing:
        check_checkpoints(loaded)  # the models just downloaded have their weights checked too
    bind_grid(layout, grid)
    planned = make_plan(loaded, layout.store.content_hashes())
    targets = pick_targets(planned, layout, selection, force, force_all, progress)
    only = targets.jobs if targets else None
    if backend == "slurm":
        from dpr_hpc.backends.slurm import SlurmBackend

        runner = SlurmBackend(layout, planned, resources, progress, hold=hold, retry_failed=retry_failed, only=only)
    picked = f" ({len(only)} selected: {selection.describe()})" if only is not None else ""
    progress(f"grid {loaded.name}: {len(planned.cells)} cells, {len(list(planned.jobs()))} stage jobs{picked} -> {layout.root} ({backend})")
    if backend == "local":
        from dpr_hpc.backends.local import LocalBackend

        runner = LocalBackend(layout, planned, echo=progress, only=only, **limits)
    report = runner.submit(Path(grid))
    return SubmitReport(**vars(report), grid=loaded.name, run_dir=layout.root, backend=backend,
                        turned_stale=targets.turned_stale if targets else ())


def _dry_run(loaded: "Grid", layout: RunLayout, resources, selection, force: bool, force_all: bool, progress: Progress) -> SubmitReport:
    """The sbatch scripts a submit would write; writes nothing, not even the content-hash memo."""
    from dpr_hpc.backends.slurm import SlurmBackend
    from dpr_hpc.planning.plan import make_plan

    planned = make_plan(loaded, layout.store.content_hashes(remember=False))
    targets = pick_targets(planned, layout, selection, force, force_all, progress, dry_run=True)
    slurm = SlurmBackend(layout, planned, resources, progress, only=targets.jobs if targets else None)
    scripts = [(job, slurm.plan.users(job)[0], script)
               for job, script in slurm.dry_run(frozenset(targets.forced) if targets else frozenset())]
    return SubmitReport(grid=loaded.name, run_dir=layout.root, backend="slurm", scripts=scripts, notes=grid_notes(loaded))


def prefetch(grid: "str | Path", *, update: bool = False, runs_root: "str | Path | None" = None,
             progress: Progress = quiet) -> "PrefetchReport":
    """Download every hub model the grid names into the Hugging Face cache and pin each to a
    commit for every grid under the runs root (with `update`, move the pins to the hub's main);
    download and verify every data file the grid names (dpr:nq-train, ...) instead of a path."""
    from dpr_hpc.grid import load_grid
    from dpr_hpc.grid.sources import data_dir
    from dpr_hpc.inputs.sources import DataPins, fetch_all, grid_values
    from dpr_hpc.store.bindings import bind_grid, check_binding

    loaded = load_grid(grid, require_data=False)
    layout = RunLayout.for_grid(loaded.name, runs_root_or_default(runs_root))
    check_binding(layout, grid)
    revisions = fetch_hub_models(loaded, layout, update=update, progress=progress)
    data = fetch_all(grid_values(loaded), echo=progress)
    bind_grid(layout, grid)
    return PrefetchReport(loaded.name, revisions, layout.store.hub_pins_file, layout.hub_models, data, DataPins(data_dir()).path)


@dataclass(frozen=True)
class PrefetchReport:
    grid: str
    revisions: dict[str, str | None]  # hub model -> the commit its jobs load
    pins_file: Path
    models_file: Path
    data: dict[str, Path]  # named data source -> its verified local file
    data_pins_file: Path


def check_checkpoints(grid: "Grid") -> None:
    """Load every encoder checkpoint of the grid that is here (once per content: it is remembered),
    so a weight that does not load stops the grid before the queue wait, not in the stage job."""
    from dpr_hpc.modeling.checked_weights import check_grid_checkpoints
    from dpr_hpc.stages.runner import quiet_libraries

    check_grid_checkpoints(grid, before_loading=quiet_libraries)


def fetch_hub_models(grid: "Grid", layout: RunLayout, update: bool, progress: Progress) -> dict[str, str | None]:
    """Every hub model the grid names in the local cache at the commit its runs root pins,
    fetched where the cache lacks it, and pinned at its first use (with `update`, as
    `prefetch --update` does, at the hub's main now, moving the pin); recorded in the run
    folder's models.json. The stage jobs run offline. A model neither cached nor reachable is a
    grid error naming it."""
    from dpr_hpc.inputs.hub import HubPins, HubUnreachableError, hub_cache_dir, sync_pins
    from dpr_hpc.store.bindings import record_hub_models

    models = list(dict.fromkeys(model for cell in grid.cells for model in cell.hub_models))
    pins_file = HubPins(layout.store.hub_pins_file)
    try:
        sync_pins(models, pins_file, update, echo=progress)
    except HubUnreachableError as error:
        group = next(cell.group for cell in grid.cells if error.model in cell.hub_models)
        at = f" at its pinned commit {error.pinned} ({pins_file.path})" if error.pinned else ""
        raise GridError(str(grid.path), f"block {group}: encoder", f"hub model {error.model}{at} is neither in the local Hugging Face cache "
                        f"({hub_cache_dir()}) nor reachable: {error.reason}; run 'dpr-hpc prefetch' where the hub is reachable, "
                        "or set HF_HOME to a cache that has it") from None
    return record_hub_models(layout, models)


def grid_notes(grid: "Grid") -> GridNotes:
    from dpr_hpc.inputs.hub import hub_cache_dir, uncached

    models = uncached(model for cell in grid.cells for model in cell.hub_models)
    return GridNotes(Path(grid.path), tuple(grid.missing_data), tuple(models), hub_cache_dir())


def local_limits(time_limit_min: float | None, signal_delay_s: int | None) -> dict[str, float]:
    """The local backend's time limit and warning signal, checked as SLURM would check them."""
    limits: dict[str, float] = {}
    if time_limit_min is not None:
        if not (math.isfinite(time_limit_min) and time_limit_min > 0):
            raise UsageError(f"--time-limit: expected a positive number of minutes, got {time_limit_min:g}")
        limits["timeout_min"] = time_limit_min
    if signal_delay_s is not None:
        if signal_delay_s < 1:
            raise UsageError(f"--signal-delay: expected a positive number of seconds, got {signal_delay_s}")
        limits["signal_delay_s"] = signal_delay_s
    return limits
