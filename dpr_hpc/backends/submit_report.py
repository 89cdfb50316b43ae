"""What a submit does, job by job, whichever backend runs it: the records checked first, then
what ran, what was skipped and why. Which jobs a submit acts on is decided before, by the
service layer (dpr_hpc.api.targets); a backend is handed them as `only`."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpr_hpc.errors import RecordUnreadableError
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.store.records import RecordCheck, Records, promote


def check_records(plan: Plan, records: Records) -> dict[StageJob, RecordCheck]:
    """Every job's record, checked before anything is submitted, so an unreadable one stops
    the submit whole rather than half-way. A complete attempt that a crash left without its
    result.json becomes the job's record here, rather than being run again."""
    checks = {job: records.check(job) for job in plan.jobs()}
    unreadable = [f"{job.id}: {check.reason}" for job, check in checks.items() if check.state == "unreadable"]
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise RecordUnreadableError(f"cannot read what a stage record is checked against, so nothing was submitted: {unreadable[0]}{more}; "
                                    "fix the file system or permissions (or move the file aside to run the stage again), then submit again")
    for job, check in checks.items():
        promote(records.store.job(job), check)
    return checks


def rerun_reasons(plan: Plan, checks: dict[StageJob, RecordCheck], history: dict, records: Records) -> dict[StageJob, str]:
    """Why each job that is not complete runs again, for those that ran before: its own record is
    stale, or it replaces an earlier key's record of the same cell (an input's content changed)."""
    from dpr_hpc.store.bindings import superseded

    reasons = {}
    for job, check in checks.items():
        if check.state in ("stale", "invalid"):
            reasons[job] = f"rerun: its record is {check.state} ({check.reason})"
        elif check.state == "missing" and (why := superseded(history, plan, job, records)):
            reasons[job] = f"rerun: it {why}"
    return reasons


@dataclass
class SubmitReport:
    ran: list[StageJob] = field(default_factory=list)  # run here, or handed to the scheduler
    skipped: list[StageJob] = field(default_factory=list)  # a valid result exists
    active: list[StageJob] = field(default_factory=list)  # already pending or running in the scheduler
    failed: list[StageJob] = field(default_factory=list)
    blocked: list[StageJob] = field(default_factory=list)
    deferred: list[StageJob] = field(default_factory=list)  # over the cluster's submit limit this time

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def summary(self, verb: str = "ran") -> str:
        parts = [f"{len(self.ran)} {verb}", f"{len(self.skipped)} already complete (skipped)"]
        if self.active:
            parts.append(f"{len(self.active)} already queued or running (left alone)")
        if self.deferred:
            parts.append(f"{len(self.deferred)} deferred (submit limit reached; run submit again later)")
        parts += [f"{len(self.failed)} failed", f"{len(self.blocked)} blocked"]
        return ", ".join(parts)
