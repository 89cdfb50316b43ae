"""Which stage jobs a submit acts on: a selection (--cell, --group, --stage), the upstream
jobs it needs that are not complete, the complete ones --force reruns, and the jobs outside
it that a forced rerun turns stale. Decided here, before a backend is handed the jobs, so
that each backend only runs what it is given and the submit report only reports."""

from __future__ import annotations

from dataclasses import dataclass

from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.planning.selection import Selection
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.store.records import Records, request_rerun

from dpr_hpc.api.common import Progress


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
    """`force` asks every selected complete job for a rerun (store.records.request_rerun), except in a
    dry run, which writes nothing; nothing is deleted, the new attempt's record replaces the
    old one once it is complete."""
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


def pick_targets(plan: Plan, layout: RunLayout, selection: Selection, force: bool, force_all: bool, progress: Progress,
                 dry_run: bool = False) -> SubmitTargets | None:
    """What a submit with a selection or a forced rerun acts on (None: every job, none forced),
    with a progress line for each forced rerun and each upstream job it adds."""
    if selection.everything and not force_all:
        return None
    [selected] = selection.apply([plan])
    records = Records(layout.store, plan=plan)
    targets = submit_targets(plan, selected, records, force=force or force_all, dry_run=dry_run)
    for job in targets.forced:
        progress(f"{job.id}: forced rerun (--force); its complete attempt {records.check(job).attempt} stays on disk")
    for job in targets.upstream:
        progress(f"{job.id}: not complete, and a selected job needs it: it runs first")
    return targets
