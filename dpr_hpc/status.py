"""Where every cell x stage x repeat stands, read from the run folder.

A stage is COMPLETED only when its result record validates; markers left by the stage runner
tell FAILED and RUNNING apart from PENDING; a job whose inputs can no longer come is BLOCKED.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from dpr_hpc.backends import scheduler
from dpr_hpc.errors import ResultInvalidError
from dpr_hpc.layout import RunLayout, StagePaths
from dpr_hpc.ledger import Ledger
from dpr_hpc.locks import pid_alive
from dpr_hpc.plan import Plan, StageJob
from dpr_hpc.provenance import node_label
from dpr_hpc.results import load_record
from dpr_hpc.runstate import latest_log, read_marker, resumable

STATES = ("COMPLETED", "RUNNING", "PENDING", "REQUEUED", "HELD", "FAILED", "TIMEOUT", "CANCELLED", "INTERRUPTED", "BLOCKED")
_DEAD_ENDS = ("FAILED", "TIMEOUT", "CANCELLED", "INTERRUPTED", "BLOCKED")


@dataclass(frozen=True)
class StageState:
    job: StageJob
    state: str
    node: str = ""
    detail: str = ""
    log: str = ""
    job_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self.job.to_json(), "state": self.state, "node": self.node, "detail": self.detail, "log": self.log, "job_id": self.job_id}


@dataclass(frozen=True)
class StatusReport:
    states: list[StageState]
    source: str  # where job states came from: the run folder alone, sacct, or squeue


def stage_states(layout: RunLayout, plan: Plan) -> StatusReport:
    """Every stage job's state: the run folder's records and markers, and for jobs in the
    ledger what the scheduler says of them, asked once for all of them."""
    ledger = Ledger.read(layout)
    ids = ledger.latest_ids()
    view = scheduler.query(list(ids.values()), ledger.first_submission(), ledger.users()) if ids and scheduler.slurm_available() else None
    states: dict[StageJob, StageState] = {}
    for job in plan.jobs():
        states[job] = _state_of(layout, plan, job, states, ids.get(job.key), view, ledger.recently_submitted(job))
    source = "run folder" if view is None else f"run folder and {view.source}"
    if ids and view is None:
        source += " (SLURM jobs in the ledger, but no SLURM commands here)"
    return StatusReport(list(states.values()), source)


def _state_of(
    layout: RunLayout, plan: Plan, job: StageJob, known: dict[StageJob, StageState],
    job_id: str | None = None, view: scheduler.SchedulerView | None = None, recent: bool = False,
) -> StageState:
    paths = layout.stage(job)
    invalid = ""
    if paths.result.exists():
        try:
            record = load_record(paths.result, plan.cell(job.cell_id), job)
            return StageState(job, "COMPLETED", node_label(record["node"]), headline(record), job_id=job_id or "")
        except ResultInvalidError as exc:
            invalid = f"result ignored: {exc}"
    log = str(latest_log(paths) or "")
    dead = [dep for dep in plan.dependencies(job) if known[dep].state in _DEAD_ENDS]
    blocked = StageState(job, "BLOCKED", detail=f"{dead[0].stage} r{dead[0].repeat} {known[dead[0]].state.lower()}", job_id=job_id or "") if dead else None
    state = _unfinished_state(paths, job, job_id, view, log, invalid, recent, blocked)
    training = training_progress(paths)
    if training and state.state != "BLOCKED":
        state = replace(state, detail=f"{state.detail}; {training}" if state.detail else training)
    return state


def _unfinished_state(
    paths: StagePaths, job: StageJob, job_id: str | None, view: scheduler.SchedulerView | None,
    log: str, invalid: str, recent: bool, blocked: StageState | None,
) -> StageState:
    if job_id and view is not None:
        state = _scheduler_state(job, job_id, view.jobs.get(job_id), log, invalid, recent)
        if state.state in _DEAD_ENDS and resumable(paths):
            return StageState(job, "INTERRUPTED", state.node, f"{state.detail}; stopped after a checkpoint: submit again to resume", log, job_id)
        # Cancelled by SLURM (kill-on-invalid-dep), or waiting on a dependency that failed.
        return blocked if blocked and state.state in ("PENDING", "CANCELLED", "BLOCKED") else state
    failure = read_marker(paths.failure)
    if failure:
        return StageState(job, "FAILED", failure.get("host", ""), failure.get("error", ""), log)
    running = read_marker(paths.running)
    if running:
        if running.get("host") == socket.gethostname() and not running.get("slurm_job_id") and not pid_alive(running.get("pid")):
            return StageState(job, "INTERRUPTED", running["host"], "the process died without a result; submit again to resume", log)
        return StageState(job, "RUNNING", running.get("host", ""), f"since {running.get('started_at', '?')}", log)
    interrupted = read_marker(paths.interrupted)
    if interrupted:
        return StageState(job, "INTERRUPTED", interrupted.get("host", ""), f"{interrupted.get('reason', '')}; submit again to resume", log)
    if blocked:
        return blocked
    return StageState(job, "PENDING", detail=invalid)


def training_progress(paths: StagePaths) -> str:
    """'epoch 3/40, step 1200/16000, 2 restarts' for a training that has started and not finished."""
    if paths.result.exists():
        return ""
    progress = read_marker(paths.progress)
    if not progress:
        return ""
    restarts = progress.get("restarts", 0)
    return (f"epoch {progress.get('epoch')}/{progress.get('epochs')}, step {progress.get('step')}/{progress.get('total_steps')}, "
            f"{restarts} restart{'s' if restarts != 1 else ''}")


def _scheduler_state(job: StageJob, job_id: str, info: scheduler.JobInfo | None, log: str, invalid: str, recent: bool) -> StageState:
    """A stage the scheduler knows, with no valid record: what SLURM says, never COMPLETED."""
    if info is None:
        if recent:
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


def headline(record: dict[str, Any]) -> str:
    """The figure a person looks for first in each stage's record."""
    t, m = record["timings"], record["metrics"]
    if record["stage"] == "train":
        return f"TTT {t['ttt_s']:.1f}s, final loss {m.get('final_loss', float('nan')):.3f}"
    if record["stage"] == "index":
        return f"PEI {t['pei_s']:.2f}s ({m['num_passages']} passages)"
    acc = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("acc@", "mrr@")))
    return f"ITA {t['ita_mean_ms']:.3f}ms  {acc}"


def summary_line(states: list[StageState]) -> str:
    counts = Counter(s.state for s in states)
    parts = [f"{counts[state]} {state}" for state in STATES if counts[state]]
    return f"{len(states)} stage jobs: " + ", ".join(parts)

