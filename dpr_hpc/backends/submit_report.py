"""What a submit does, job by job, whichever backend runs it: the records checked first, then
what ran, what was skipped and why."""

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
    from dpr_hpc.store.runs import superseded

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


@dataclass(frozen=True)
class SubmitTargets:
    """The jobs a submit with a selection acts on: the selected ones, the upstream jobs they
    need that are not complete (run first, as Snakemake runs a target's inputs), those forced
    to rerun, and the jobs outside the selection that a forced rerun turns stale."""

    jobs: frozenset[StageJob]
    upstream: tuple[StageJob, ...]
    forced: tuple[StageJob, ...]
    turned_stale: tuple[StageJob, ...]


def submit_targets(plan: Plan, selected: list[StageJob], records: Records, force: bool, dry_run: bool = False) -> SubmitTargets:
    """`force` asks every selected complete job for a rerun (results.request_rerun), except in a
    dry run, which writes nothing; nothing is deleted, the new attempt's record replaces the
    old one once it is complete."""
    from dpr_hpc.store.records import request_rerun

    forced = tuple(job for job in selected if force and records.check(job).complete)
    if not dry_run:
        for job in forced:
            request_rerun(records.store.job(job), records.check(job).attempt)
        records.forget()
    chosen = set(selected)
    upstream: list[StageJob] = []
    pending = list(selected)
    while pending:
        for dep in plan.dependencies(pending.pop()):
            if dep not in chosen and not records.check(dep).complete:
                chosen.add(dep)
                upstream.append(dep)
                pending.append(dep)
    turned_stale = tuple(job for job in plan.jobs() if job not in chosen and _reads_any(plan, job, set(forced)))
    return SubmitTargets(frozenset(chosen), tuple(upstream), forced, turned_stale)


def _reads_any(plan: Plan, job: StageJob, forced: set[StageJob]) -> bool:
    """Whether a job's record is made from a forced job's, directly or through its inputs."""
    return any(up in forced or _reads_any(plan, up, forced) for up in plan.inputs(job))
