"""Where every stage job stands, read from the store, the ledger and the scheduler; and where
each cell of the grid stands through the jobs it uses.

A job is COMPLETED only when its record checks out (dpr_hpc.store.records): its artifacts intact,
its inputs' content unchanged, its upstream records the ones it was made from. A record that
fails those checks is STALE, with the reason, and `submit` reruns it. A record that cannot be
read at all is UNREADABLE: nothing is rerun on a guess. A live claim is RUNNING; a claim whose
heartbeat stopped, INTERRUPTED. Markers and the scheduler tell FAILED and PENDING apart, and a
job whose inputs can no longer come is BLOCKED. A submitted job the scheduler cannot speak for
now (it does not answer, or sacct has not listed the job and squeue fails) is UNKNOWN: never
read as gone, so never FAILED and never submitted again on that answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterator

from dpr_hpc.tracking import slurm_queue
from dpr_hpc.store.claims import beats_missed, claim_job_id, dead_claim, live_claim
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.tracking.live import ask
from dpr_hpc.locks import DEFAULT_STALE_AFTER_S, LockFile, holder_is_stale, pid_alive
from dpr_hpc.grid.config import SHARD_STAGES
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.planning.stage_keys import stage_of
from dpr_hpc.provenance import node_label
from dpr_hpc.store.records import Records, RecordCheck
from dpr_hpc.store.bindings import cell_history, superseded
from dpr_hpc.store.markers import read_marker, resumable
from dpr_hpc.tracking.logs import latest_log
from dpr_hpc.planning.selection import Selection
from dpr_hpc.store.paths import JobFolder

STATES = ("COMPLETED", "STALE", "RUNNING", "PENDING", "REQUEUED", "HELD", "FAILED", "TIMEOUT", "CANCELLED",
          "INTERRUPTED", "BLOCKED", "UNREADABLE", "UNKNOWN")
_DEAD_ENDS = ("FAILED", "TIMEOUT", "CANCELLED", "INTERRUPTED", "BLOCKED", "UNREADABLE")


@dataclass(frozen=True)
class StageState:
    job: StageJob
    state: str
    node: str = ""
    detail: str = ""
    log: str = ""
    job_id: str = ""
    attempt: int | None = None  # the store attempt shown: the complete record's, else the newest

    def __post_init__(self) -> None:
        if not isinstance(self.log, str):  # a _LazyLog: looked up now, for a state that shows it
            object.__setattr__(self, "log", str(self.log))

    def to_json(self) -> dict[str, Any]:
        return {**self.job.to_json(), "state": self.state, "node": self.node, "detail": self.detail, "log": self.log, "job_id": self.job_id,
                "attempt": self.attempt}


@dataclass(frozen=True)
class CellStage:
    """One row of `status`: a cell's stage repeat, and the state of the job behind it."""

    cell_id: str
    state: StageState
    shared_by: int  # how many of the grid's cells use this job

    def to_json(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "shared_by": self.shared_by, **self.state.to_json()}


@dataclass(frozen=True)
class StatusReport:
    jobs: dict[StageJob, StageState]
    rows: list[CellStage]
    source: str  # where job states came from: the store alone, sacct, or squeue
    left_cells: str  # a line about cells that left the grid, or ""

    @property
    def states(self) -> list[StageState]:
        return list(self.jobs.values())


def stage_states(layout: RunLayout, plan: Plan, records: Records | None = None) -> StatusReport:
    """Every stage job's state, the scheduler asked once for all of them."""
    records = records or Records(layout.store, plan=plan)
    states, source = _states_of(layout, plan, list(plan.jobs()), records)
    return _report(layout, plan, records, states, source)


def job_state(layout: RunLayout, plan: Plan, job: StageJob) -> StageState:
    """One stage job's state, as `status` shows it, worked out from that job and the jobs it
    waits on only (`logs -f` asks it every half second, so it must not cost a whole status)."""
    needed, pending = {job}, [job]
    while pending:
        for dep in plan.dependencies(pending.pop()):
            if dep not in needed:
                needed.add(dep)
                pending.append(dep)
    in_order = [j for j in plan.jobs() if j in needed]  # the plan's order puts each job after those it waits on
    states, _ = _states_of(layout, plan, in_order, Records(layout.store, plan=plan))
    return states[job]


def queued_or_running(state: StageState) -> bool:
    """Whether a job may still write to its log: it runs, or a scheduler holds it queued (held
    included: a person may release it), or the scheduler cannot say whether it still runs."""
    return state.state in ("RUNNING", "REQUEUED", "HELD", "UNKNOWN") or (state.state == "PENDING" and bool(state.job_id))


def _states_of(layout: RunLayout, plan: Plan, jobs: list[StageJob], records: Records) -> tuple[dict[StageJob, StageState], str]:
    """The states of `jobs` (each after the jobs it depends on) and where they came from; the
    scheduler is asked once, for all of them."""
    store = layout.store
    ledger = Ledger.read(store)
    live = ask(ledger, jobs)
    ids, standings, source = live.job_ids, live.standings, "store"
    if live.no_slurm_here:
        source += f" ({live.unanswered})"
    elif live.unanswered:
        return {job: _unknown(job, records, ids.get(job), live.unanswered) for job in jobs}, f"store only: {live.unanswered}"
    elif ids:
        source = f"store and {live.source}"
    states: dict[StageJob, StageState] = {}
    history = cell_history(layout)
    for job in jobs:
        check = records.check(job)
        if check.state == "missing" and (why := superseded(history, plan, job, records)):
            check = RecordCheck("stale", why)
        states[job] = _state_of(store.job(job), plan, job, check, states, ids.get(job), standings.get(job))
    return states, source


def selected_status(runs: list[tuple[RunLayout, Plan]], selection: Selection) -> Iterator[tuple[RunLayout, Plan, StatusReport]]:
    """Each run's status narrowed to a selection (--cell, --group, --stage): its rows and the
    states its summary counts; runs with no selected job are left out. The states are worked
    out over the whole plan, since a selected job's state depends on its upstream jobs'."""
    for (layout, plan), jobs in zip(runs, selection.apply([plan for _, plan in runs])):
        if not jobs:
            continue
        report = stage_states(layout, plan)
        if selection.everything:
            yield layout, plan, report
            continue
        cells = set(selection.cell_ids(plan))
        rows = [row for row in report.rows if row.cell_id in cells and selection.picks_stage(row.state.job.stage)]
        yield layout, plan, replace(report, jobs={job: report.jobs[job] for job in jobs}, rows=rows)


# States of a job that a scheduler or a local submit is still working on. HELD is not one: a
# held job waits on a person (scontrol release), so `status --watch` would never end on it.
_IN_PROGRESS = ("RUNNING", "REQUEUED")


def still_active(layout: RunLayout, report: StatusReport) -> bool:
    """Whether anything may still change by itself: a job queued (on SLURM: it has a job id) or
    running, or a local submit working through the run's jobs (between two jobs none runs)."""
    if any(s.state in _IN_PROGRESS or (s.state == "PENDING" and s.job_id) for s in report.states):
        return True
    holder = LockFile.read_holder(layout.submit_lock)
    return holder is not None and not holder_is_stale(holder, DEFAULT_STALE_AFTER_S)


def _report(layout: RunLayout, plan: Plan, records: Records, states: dict[StageJob, StageState], source: str) -> StatusReport:
    states = {job: replace(state, attempt=shown_attempt(layout.store.job(job), records.check(job), state.state))
              for job, state in states.items()}
    rows = [
        CellStage(cell.cell_id, states[job], len(plan.users(job)))
        for cell in plan.cells for stage in cell.stages for job in plan.cell_jobs(cell.cell_id, stage)
    ]
    return StatusReport(states, rows, source, left_cells_line(layout, plan, records))


def shown_attempt(folder: JobFolder, check: RecordCheck, state: str) -> int | None:
    """The attempt a status row speaks of: the complete record's; while a job runs (a forced
    rerun included) or after it failed, its newest attempt; else the record's, if any."""
    if check.complete or state not in ("RUNNING", "REQUEUED", "FAILED", "TIMEOUT", "INTERRUPTED"):
        return check.attempt if check.record else (None if state == "PENDING" else _newest(folder))
    return _newest(folder)


def _newest(folder: JobFolder) -> int | None:
    latest = folder.latest_attempt()
    return latest.number if latest else None


def _unknown(job: StageJob, records: Records, job_id: str | None, why: str) -> StageState:
    check = records.check(job)
    if check.complete:
        return _completed(job, check, job_id)
    return StageState(job, "UNKNOWN" if job_id else _without_scheduler(check), detail=why if job_id else check.reason, job_id=job_id or "")


def _without_scheduler(check: RecordCheck) -> str:
    return {"stale": "STALE", "invalid": "STALE", "unreadable": "UNREADABLE"}.get(check.state, "PENDING")


def _completed(job: StageJob, check: RecordCheck, job_id: str | None) -> StageState:
    return StageState(job, "COMPLETED", node_label(check.record["node"]), headline(check.record), job_id=job_id or "")


def _state_of(
    folder: JobFolder, plan: Plan, job: StageJob, check: RecordCheck, known: dict[StageJob, StageState],
    job_id: str | None = None, standing: slurm_queue.Standing | None = None,
) -> StageState:
    if check.complete:
        return _completed(job, check, job_id)
    if check.state == "unreadable":
        return StageState(job, "UNREADABLE", detail=f"{check.reason}; fix or remove it, then submit again", job_id=job_id or "")
    log = _LazyLog(folder)
    holder = live_claim(folder)
    if (holder and standing is not None and standing.info is not None and not standing.info.active
            and claim_job_id(holder) == standing.job_id and beats_missed(holder)):
        holder = None  # silent for two beats, and SLURM says the job that holds it has ended (scancel, a node lost)
    if holder:
        state = StageState(job, "RUNNING", holder.get("host", ""), f"pid {holder.get('pid')}" + (f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""), log, job_id or "")
        return _with_progress(state, folder)
    stale = check.state in ("stale", "invalid")
    dead = [dep for dep in plan.dependencies(job) if known[dep].state in _DEAD_ENDS]
    blocked = StageState(job, "BLOCKED", detail=f"{dead[0].stage} r{dead[0].repeat} {known[dead[0]].state.lower()}", job_id=job_id or "") if dead else None
    if standing is not None:
        if standing.may_still_run or not stale:
            state = _scheduler_state(job, standing, log, check.reason)
            if state.state in _DEAD_ENDS and resumable(folder):
                state = StageState(job, "INTERRUPTED", state.node, f"{state.detail}; stopped after a checkpoint: submit again to resume", log, job_id)
            elif blocked and state.state in ("PENDING", "CANCELLED", "BLOCKED"):
                state = blocked  # cancelled by SLURM (kill-on-invalid-dep), or waiting on a failed job
            return _with_progress(state, folder)
    if stale:
        return _rerun_state(folder, job, check, log, job_id or "") or StageState(
            job, "STALE", detail=f"{check.reason}; submit reruns it", log=log, job_id=job_id or "")
    return _with_progress(_marked_state(folder, job, log, blocked), folder)


def _rerun_state(folder: JobFolder, job: StageJob, check: RecordCheck, log, job_id: str) -> StageState | None:
    """A rerun of a stale record (forced or not) whose newer attempt failed, or stopped after a
    checkpoint: FAILED or INTERRUPTED, so that status does not show it as merely STALE."""
    latest = folder.latest_attempt()
    if latest is None or check.attempt is None or latest.number == check.attempt:
        return None
    still = f"attempt {check.attempt} is still {check.state} ({check.reason})"
    failure = read_marker(latest.failure)
    if failure:
        return StageState(job, "FAILED", failure.get("host", ""), f"its rerun failed: {failure.get('error', '')}; {still}; submit reruns it", log, job_id)
    stopped = read_marker(latest.interrupted)
    if stopped:
        return StageState(job, "INTERRUPTED", stopped.get("host", ""), f"its rerun {stopped.get('reason', '')}; {still}; submit again to resume", log, job_id)
    return None


class _LazyLog:
    """The job's newest log, looked up only for the states that show it (a glob per job would
    make `status` of a large grid slow)."""

    def __init__(self, folder: JobFolder) -> None:
        self.folder = folder

    def __str__(self) -> str:
        return str(latest_log(self.folder) or "")


def _marked_state(folder: JobFolder, job: StageJob, log, blocked: StageState | None) -> StageState:
    """A job the scheduler does not speak for (the local backend's): its attempt's markers."""
    attempt = folder.latest_attempt()
    failure = read_marker(attempt.failure) if attempt else None
    if failure:
        return StageState(job, "FAILED", failure.get("host", ""), failure.get("error", ""), log)
    dead = dead_claim(folder)
    if dead:
        return StageState(job, "INTERRUPTED", dead.get("host", ""), "the job died without a result (its claim's heartbeat stopped); submit again to resume", log)
    interrupted = read_marker(attempt.interrupted) if attempt else None
    if interrupted:
        return StageState(job, "INTERRUPTED", interrupted.get("host", ""), f"{interrupted.get('reason', '')}; submit again to resume", log)
    return blocked or StageState(job, "PENDING")


def _with_progress(state: StageState, folder: JobFolder) -> StageState:
    training = training_progress(folder) if state.job.stage == "train" and state.state != "BLOCKED" else ""
    return replace(state, detail=f"{state.detail}; {training}" if state.detail else training) if training else state


def training_progress(folder: JobFolder) -> str:
    """'epoch 3/40, step 1200/16000, 2 restarts' for a training that has started and not finished."""
    attempt = folder.latest_attempt()
    if attempt is None or attempt.record.exists():
        return ""
    progress = read_marker(attempt.progress)
    if not progress:
        return ""
    restarts = progress.get("restarts", 0)
    epoch, step = progress.get("epoch"), progress.get("step")
    live = read_marker(attempt.meter)  # progress.json is written at checkpoints; the meter every second
    if live and isinstance(progress.get("epochs"), int) and progress.get("total_steps"):
        step = live["done"]
        epoch = step * progress["epochs"] // progress["total_steps"]
    return (f"epoch {epoch}/{progress.get('epochs')}, step {step}/{progress.get('total_steps')}, "
            f"{restarts} restart{'s' if restarts != 1 else ''}")


def _scheduler_state(job: StageJob, standing: slurm_queue.Standing, log: str, invalid: str) -> StageState:
    """A stage the scheduler knows, with no valid record: what SLURM says, never COMPLETED."""
    job_id, info = standing.job_id, standing.info
    if info is None:
        if standing.unknown:
            return StageState(job, "UNKNOWN", detail="not in sacct yet, and squeue did not answer; left alone", log=log, job_id=job_id)
        if standing.recent:
            return StageState(job, "PENDING", detail="submitted; not yet listed by the scheduler", job_id=job_id)
        return StageState(job, "FAILED", detail="no longer listed by the scheduler, and no result", log=log, job_id=job_id)
    if info.status == "PENDING":
        if info.reason.startswith("DependencyNeverSatisfied"):
            return StageState(job, "BLOCKED", detail="an upstream job failed", job_id=job_id)
        return StageState(job, "PENDING", detail=info.reason, job_id=job_id)
    if info.active:
        detail = f"elapsed {info.elapsed}" if info.state in ("RUNNING", "REQUEUED") else f"{info.state}, elapsed {info.elapsed}"
        return StageState(job, info.status, info.node, detail, log, job_id)
    if info.status == "COMPLETED":
        return StageState(job, "FAILED", info.node, invalid or "the job ended without a valid result record", log, job_id)
    return StageState(job, info.status, info.node, f"{info.state} exit code {info.exit_code}", log, job_id)


def left_cells_line(layout: RunLayout, plan: Plan, records: Records) -> str:
    """Cells planned here before that the grid no longer has: counted, never hidden or deleted."""
    gone = {cell_id: entry for cell_id, entry in cell_history(layout).items() if not plan.has_cell(cell_id)}
    if not gone:
        return ""
    ledger = Ledger.read(layout.store)
    with_results = with_jobs = 0
    for entry in gone.values():
        jobs = [StageJob(stage_of(slot), key, r) for slot, key in entry["keys"].items()
                for r in range(entry.get("repeats", {}).get(slot, 1) if slot != "train" else 1)]
        with_results += any(records.check(j).complete for j in jobs)
        with_jobs += any(ledger.latest(j) for j in jobs if not records.check(j).complete)
    return (f"{len(gone)} cell(s) left the grid since an earlier submit: {with_results} with results, "
            f"{with_jobs} with submitted jobs not complete (nothing deleted; their outputs stay in the store)")


def headline(record: dict[str, Any]) -> str:
    """The figure a person looks for first in each stage's record."""
    t, m = record["timings"], record["metrics"]
    if record["stage"] == "train":
        return f"TTT {t['ttt_s']:.1f}s, final loss {m.get('final_loss', float('nan')):.3f}"
    if record["stage"] == "index":
        return f"PEI {t['pei_s']:.2f}s ({m['num_passages']} passages)"
    if record["stage"] == "encode-shard":
        return f"shard {m['shard'] + 1}/{m.get('shards', '?')}: {m['num_passages']} passages encoded in {t['encode_s']:.2f}s"
    if record["stage"] == "search-shard":
        return f"shard {m['shard'] + 1}/{m.get('shards', '?')}: {m['num_questions']} questions searched in {t['search_s']:.2f}s"
    if record["stage"] == "merge":
        figures = sorted((k for k in m if k.startswith(("answer_acc@", "mrr@"))), key=lambda k: (k.startswith("mrr"), int(k.split("@")[1])))
        acc = "  ".join(f"{k.replace('answer_', '')} {m[k]:.3f}" for k in figures)
        return f"{m.get('corpus', 'corpus')}, {m['shards']} shards: {acc}"
    acc = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("acc@", "mrr@")))
    return f"ITA {t['ita_mean_ms']:.3f}ms  {acc}"


def summary_line(states: list[StageState]) -> str:
    counts = Counter(s.state for s in states)
    parts = [f"{counts[state]} {state}" for state in STATES if counts[state]]
    return f"{len(states)} stage jobs: " + ", ".join(parts)


# An array task in one of these states is named on a line of its own under its array's line, with
# why and its log: the table does not list the tasks, and these are the ones a user acts on.
_TASK_NEEDS_A_LOOK = ("FAILED", "TIMEOUT", "CANCELLED", "INTERRUPTED", "UNREADABLE")


def array_lines(plan: Plan, report: StatusReport) -> list[str]:
    """One line per job array of the plan (plan.ArrayGroup), e.g. 'encode-shard 3f2a9c1d 37/50
    done, 5 running, 8 pending': its tasks' states counted, for the tasks this report covers;
    under it, one indented line per task that ended without a result (_TASK_NEEDS_A_LOOK)."""
    lines = []
    for group in plan.array_groups():
        tasks = [(index, report.jobs[job]) for index, job in enumerate(group.jobs) if job in report.jobs]
        if not tasks:
            continue
        counts = Counter(state.state for _, state in tasks)
        others = [f"{counts[state]} {state.lower()}" for state in STATES if state != "COMPLETED" and counts[state]]
        head, _, key = group.name.partition("/")
        lines.append(f"{head}{' ' + key[:8] if key else ''} {counts['COMPLETED']}/{len(tasks)} done" + "".join(f", {part}" for part in others))
        lines.extend(_task_line(index, state) for index, state in tasks if state.state in _TASK_NEEDS_A_LOOK)
    return lines


def _task_line(index: int, state: StageState) -> str:
    """'  shard 1 FAILED: RuntimeError: node lost  log: ...': a corpus array's task i is shard i."""
    which = f"shard {index}" if state.job.stage in SHARD_STAGES else f"r{state.job.repeat}"
    return f"  {which} {state.state}" + (f": {state.detail}" if state.detail else "") + (f"  log: {state.log}" if state.log else "")


def array_members(plan: Plan) -> frozenset[StageJob]:
    """The jobs status shows on their array's line, not a row each (unless asked: --verbose)."""
    return frozenset(job for group in plan.array_groups() for job in group.jobs)
