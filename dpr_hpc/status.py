"""Where every cell x stage x repeat stands, read from the run folder.

A stage is COMPLETED only when its result record validates; markers left by the stage runner
tell FAILED and RUNNING apart from PENDING; a job whose inputs can no longer come is BLOCKED.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dpr_hpc.errors import ResultInvalidError
from dpr_hpc.layout import RunLayout
from dpr_hpc.plan import Plan, StageJob
from dpr_hpc.provenance import node_label
from dpr_hpc.results import load_record
from dpr_hpc.runstate import latest_log, read_marker

STATES = ("COMPLETED", "RUNNING", "PENDING", "FAILED", "INTERRUPTED", "BLOCKED")
_DEAD_ENDS = ("FAILED", "INTERRUPTED", "BLOCKED")


@dataclass(frozen=True)
class StageState:
    job: StageJob
    state: str
    node: str = ""
    detail: str = ""
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self.job.to_json(), "state": self.state, "node": self.node, "detail": self.detail, "log": self.log}


def disk_states(layout: RunLayout, plan: Plan) -> list[StageState]:
    states: dict[StageJob, StageState] = {}
    for job in plan.jobs():
        states[job] = _state_of(layout, plan, job, states)
    return list(states.values())


def _state_of(layout: RunLayout, plan: Plan, job: StageJob, known: dict[StageJob, StageState]) -> StageState:
    paths = layout.stage(job)
    invalid = ""
    if paths.result.exists():
        try:
            record = load_record(paths.result, plan.cell(job.cell_id), job)
            return StageState(job, "COMPLETED", node_label(record["node"]), headline(record))
        except ResultInvalidError as exc:
            invalid = f"result ignored: {exc}"
    log = latest_log(paths)
    failure = read_marker(paths.failure)
    if failure:
        return StageState(job, "FAILED", failure.get("host", ""), failure.get("error", ""), str(log or ""))
    running = read_marker(paths.running)
    if running:
        if running.get("host") == socket.gethostname() and not running.get("slurm_job_id") and not _alive(running.get("pid")):
            return StageState(job, "INTERRUPTED", running["host"], "the process died without a result", str(log or ""))
        return StageState(job, "RUNNING", running.get("host", ""), f"since {running.get('started_at', '?')}", str(log or ""))
    blocked_by = [dep for dep in plan.dependencies(job) if known[dep].state in _DEAD_ENDS]
    if blocked_by:
        return StageState(job, "BLOCKED", detail=f"{blocked_by[0].stage} r{blocked_by[0].repeat} {known[blocked_by[0]].state.lower()}")
    return StageState(job, "PENDING", detail=invalid)


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


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
