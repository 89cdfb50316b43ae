"""status, cancel and logs: where a grid's stage jobs stand, stopping them, and what they
wrote. Each answer comes from dpr_hpc.tracking.status, the one place that combines the
store, the ledger and the scheduler; nothing here asks the scheduler a second way."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dpr_hpc.errors import UsageError
from dpr_hpc.grid.config import SHARD_STAGES
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.store.layout import RunLayout

from dpr_hpc.api.common import Names, Target, find_runs, selection_of

if TYPE_CHECKING:
    import pandas as pd

    from dpr_hpc.store.paths import JobFolder
    from dpr_hpc.tracking.logs import JobLog
    from dpr_hpc.tracking.status import StatusReport

# The columns of `status(...)` as a DataFrame, one row per cell x stage job (a job shared by
# several cells has a row for each); `grid` last, for a call over several runs.
STATUS_COLUMNS = ("cell_id", "stage", "key", "repeat", "attempt", "state", "node", "job_id", "detail", "grid")


@dataclass(frozen=True)
class RunStatus:
    """One run's status: its rows and job states (tracking.status.StatusReport), and whether
    anything in it may still change by itself (a job queued or running, a local submit at work)."""

    layout: RunLayout
    plan: Plan
    report: "StatusReport"
    active: bool


def status_reports(target: Target = None, *, runs_root: "str | Path | None" = None, cells: Names = None,
                   groups: Names = None, stages: Names = None) -> list[RunStatus]:
    """Each run's status, narrowed to the selection; runs with no selected job are left out."""
    from dpr_hpc.tracking.status import selected_status, still_active

    return [RunStatus(layout, plan, report, still_active(layout, report))
            for layout, plan, report in selected_status(find_runs(target, runs_root), selection_of(cells, groups, stages))]


def status(target: Target = None, *, runs_root: "str | Path | None" = None, cells: Names = None, groups: Names = None,
           stages: Names = None) -> "pd.DataFrame":
    """Where every cell x stage job stands, as a DataFrame with the columns STATUS_COLUMNS
    (state: COMPLETED, RUNNING, PENDING, FAILED, STALE, ...; see `dpr-hpc status`)."""
    import pandas as pd

    rows = [
        {"cell_id": row.cell_id, "stage": s.job.stage, "key": s.job.key, "repeat": s.job.repeat, "attempt": s.attempt,
         "state": s.state, "node": s.node, "job_id": s.job_id, "detail": s.detail, "grid": run.plan.grid_name}
        for run in status_reports(target, runs_root=runs_root, cells=cells, groups=groups, stages=stages)
        for row in run.report.rows for s in [row.state]
    ]
    return pd.DataFrame(rows, columns=list(STATUS_COLUMNS)).astype({"attempt": "Int64"})


@dataclass(frozen=True)
class GridCancel:
    """What cancel did to one run: the SLURM jobs it cancelled, those it kept because other
    grids plan them too (job -> SLURM id, and those grids), and those whose fate is unknown."""

    grid: str
    cancelled: list[str]
    kept: dict[StageJob, str]
    sharing: dict[StageJob, list[str]]
    unknown: list[str]


@dataclass(frozen=True)
class CancelReport:
    grids: list[GridCancel]
    unreadable: list[str]  # run folders whose plan could not be read: nothing was kept for them

    @property
    def ok(self) -> bool:
        """Every job either cancelled or known to be over (none the scheduler could not speak for)."""
        return not any(grid.unknown for grid in self.grids)


def cancel(target: Target = None, *, runs_root: "str | Path | None" = None, cells: Names = None, groups: Names = None,
           stages: Names = None, include_shared: bool = False) -> CancelReport:
    """Cancel the queued and running SLURM jobs of the selected stage jobs. A job that another
    grid under the same runs root plans too is kept (it serves that grid as well) unless
    `include_shared`."""
    from dpr_hpc.store.runs import grids_sharing
    from dpr_hpc.tracking import slurm_queue
    from dpr_hpc.tracking.ledger import Ledger
    from dpr_hpc.tracking.live import ask

    runs = find_runs(target, runs_root)
    selected = selection_of(cells, groups, stages).apply([plan for _, plan in runs])
    shared, unreadable = ({}, []) if include_shared else grids_sharing(runs)
    done = []
    for (layout, plan), jobs in zip(runs, selected):
        standings = ask(Ledger.read(layout.store), jobs).require().standings
        active = {job: s.job_id for job, s in standings.items() if s.info is not None and s.info.active}
        unknown = sorted({s.job_id for s in standings.values() if s.unknown})
        kept = {job: job_id for job, job_id in active.items() if job in shared}
        cancelled = sorted(set(active.values()) - set(kept.values()))
        slurm_queue.cancel(cancelled)
        done.append(GridCancel(plan.grid_name, cancelled, kept, {job: sorted(set(shared[job])) for job in kept}, unknown))
    return CancelReport(done, unreadable)


@dataclass(frozen=True)
class StageLogs:
    """The stage job `logs` shows for a cell, and its log files (the newest attempt's, or the
    attempt asked for)."""

    layout: RunLayout
    plan: Plan
    cell_id: str
    job: StageJob
    attempt: int | None
    logs: "list[JobLog]"

    @property
    def folder(self) -> "JobFolder":
        return self.layout.store.job(self.job)

    def active(self) -> bool:
        """Whether the job may still write to its log: status's answer for this job."""
        from dpr_hpc.tracking.status import job_state, queued_or_running

        return queued_or_running(job_state(self.layout, self.plan, self.job))


def logs(cell: str, *, grid: Target = None, stage: str | None = None, repeat: int = 0, attempt: int | None = None,
         runs_root: "str | Path | None" = None, shard: int | None = None) -> StageLogs:
    """The logs of one stage job of one cell (a cell id, or a glob matching one cell): of
    `stage` (of its `shard` for a corpus's shard stage), or of the cell's last stage that has a log."""
    from dpr_hpc.tracking.logs import chosen_logs

    layout, plan, cell_id = one_cell(cell, find_runs(grid, runs_root))
    job = logged_job(layout, plan, cell_id, stage, repeat, shard)
    return StageLogs(layout, plan, cell_id, job, attempt, chosen_logs(layout.store.job(job), attempt))


def logged_job(layout: RunLayout, plan: Plan, cell_id: str, stage: str | None, repeat: int, shard: int | None = None) -> StageJob:
    """The stage job `logs` shows: of `stage`, or of the cell's last stage with a log for this
    repeat (else its first stage, whose log comes first). A shard stage's jobs are one per
    shard, each run once (an array task on SLURM): `shard` picks one, shard 0 by default."""
    from dpr_hpc.tracking.logs import job_logs

    cell = plan.cell(cell_id)
    if stage is not None and stage not in cell.stages:
        raise UsageError(f"--stage {stage}: cell {cell_id} has the stages {', '.join(cell.stages)}")
    if shard is not None:
        if stage not in SHARD_STAGES:
            raise UsageError(f"--shard {shard}: only with --stage {' or --stage '.join(SHARD_STAGES)}, whose jobs are one per shard")
        shards = plan.cell_jobs(cell_id, stage)
        if shard not in range(len(shards)):
            raise UsageError(f"--shard {shard}: cell {cell_id}'s corpus has the shards 0 to {len(shards) - 1}")
        return shards[shard]
    stages = [stage] if stage else list(reversed(cell.stages))
    jobs = [plan.cell_jobs(cell_id, s)[repeat] for s in stages if repeat in range(cell.repeats.of(s))]
    if not jobs:
        raise UsageError(f"--repeat {repeat}: cell {cell_id}'s {' and '.join(stages)} has repeats 0 to {cell.repeats.of(stages[0]) - 1}")
    if stage:
        return jobs[0]
    return next((job for job in jobs if job_logs(layout.store.job(job))), jobs[-1])


def one_cell(pattern: str, runs: list[tuple[RunLayout, Plan]]) -> tuple[RunLayout, Plan, str]:
    """The one cell a glob names, over the runs; several cells (or one cell id in runs whose
    keys differ) is a usage error that lists them."""
    matches = [(layout, plan, c.cell_id) for layout, plan in runs for c in plan.cells if fnmatch.fnmatchcase(c.cell_id, pattern)]
    distinct = sorted({(cell_id, json.dumps(plan.keys[cell_id], sort_keys=True)) for _, plan, cell_id in matches})
    if not matches:
        raise UsageError(f"no cell matches '{pattern}'; cells here: {', '.join(c.cell_id for _, p in runs for c in p.cells[:5])} ...")
    if len(distinct) > 1:
        shown = sorted({cell_id for _, _, cell_id in matches})
        where = f"cells {', '.join(shown[:8])}" if len(shown) > 1 else f"cell {shown[0]} in runs {', '.join(str(l.root) for l, _, _ in matches)} (pass --grid)"
        raise UsageError(f"'{pattern}' matches {where}; name one")
    return matches[0]
