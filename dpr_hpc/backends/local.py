"""Local backend: the stage graph on this machine, in dependency order, one job at a time.

Each job runs in its own process through submitit's LocalExecutor, as it would on a node:
its peak memory is its own and its log lands beside its result. A job that SLURM has queued
or is running (the ledger and the scheduler say so), or that another process has claimed, is
left alone: one writer per stage job.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import submitit

from dpr_hpc.tracking import slurm_queue
from dpr_hpc.backends.submit_report import SubmitReport, check_records, rerun_reasons
from dpr_hpc.store.claims import live_claim
from dpr_hpc.errors import LockHeldError, UsageError
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.locks import HEARTBEAT_S, LockFile, describe_holder
from dpr_hpc.planning.plan import Plan, StageJob
from dpr_hpc.tracking.ledger import Ledger
from dpr_hpc.tracking.live import ask
from dpr_hpc.tracking.progress import MeterBar, bars_wanted
from dpr_hpc.inputs.hub import job_environment
from dpr_hpc.store.records import Records
from dpr_hpc.store.bindings import cell_history, save_plan
from dpr_hpc.store.markers import resumable
from dpr_hpc.stages.runner import stage_job_entry
from dpr_hpc.tracking.status import headline

DEFAULT_TIMEOUT_MIN = 48 * 60  # the cluster's job limit, the same bound here
DEFAULT_SIGNAL_DELAY_S = 300
# submitit's local controller restarts a requeued job at most 6 times whatever this says; a
# resubmit continues from the checkpoint after that.
DEFAULT_MAX_REQUEUES = 20
# submitit's local controller runs a job at most 6 times (its controller's max_retry); the
# backend starts it again while it stops resumable, up to about the requeues allowed.
CONTROLLER_RUNS = math.ceil(DEFAULT_MAX_REQUEUES / 6)


def visible_gpus() -> tuple[int, ...]:
    """The GPU ids this process may use (as CUDA_VISIBLE_DEVICES names them), read without
    importing torch. submitit's LocalExecutor hides every GPU from a job it is not given."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(int(x) for x in listed.split(",") if x.strip().isdigit())
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))


class LocalBackend:
    name = "local"

    def __init__(
        self, layout: RunLayout, plan: Plan, echo: Callable[[str], None] = print,
        timeout_min: float = DEFAULT_TIMEOUT_MIN, signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S,
        only: frozenset[StageJob] | None = None,
    ) -> None:
        """`timeout_min` is each job's time limit: as on SLURM, a job gets the warning signal
        `signal_delay_s` before it, a training checkpoints and is restarted from there. `only`:
        the jobs a selection (--cell, --group, --stage) runs; every job of the plan by default."""
        self.layout = layout
        self.plan = plan
        self.echo = echo
        self.timeout_min = timeout_min
        self.signal_delay_s = min(signal_delay_s, max(1, int(timeout_min * 60) - 1))
        self.gpus = visible_gpus()
        self.only = only

    def submit(self, grid_file: Path) -> SubmitReport:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        lock = LockFile(self.layout.submit_lock, purpose="local submit", heartbeat_s=HEARTBEAT_S)
        try:
            lock.acquire()
        except LockHeldError as exc:
            raise UsageError(f"{self.layout.root}: another submit is running on this run folder ({describe_holder(exc.holder)})") from None
        try:
            records = Records(self.layout.store, plan=self.plan)
            checks = check_records(self.plan, records)
            reasons = rerun_reasons(self.plan, checks, cell_history(self.layout), records)
            save_plan(self.layout, self.plan, grid_file)
            return self._run_all(records, checks, reasons)
        finally:
            lock.release()

    def _run_all(self, records: Records, checks: dict, reasons: dict) -> SubmitReport:
        report = SubmitReport()
        jobs = [job for job in self.plan.jobs() if self.only is None or job in self.only]
        width = len(str(len(jobs)))
        on_slurm = self._queued_on_slurm(jobs, checks)
        for number, job in enumerate(jobs, start=1):
            users = self.plan.users(job)
            shared = f" (+{len(users) - 1} cells)" if len(users) > 1 else ""
            tag = f"[{number:>{width}}/{len(jobs)}] {job.stage:<5} r{job.repeat} {users[0]}{shared}"
            check = records.check(job)
            if check.complete:
                report.skipped.append(job)
                continue
            if job in on_slurm:
                report.active.append(job)
                self.echo(f"{tag}  left alone: {on_slurm[job].describe()}")
                continue
            holder = live_claim(self.layout.store.job(job))
            if holder:
                report.active.append(job)
                self.echo(f"{tag}  left alone: {describe_holder(holder)}")
                continue
            elsewhere = [dep for dep in self.plan.dependencies(job) if dep in report.active]
            if elsewhere:
                report.active.append(job)
                self.echo(f"{tag}  left alone: waits on {elsewhere[0].stage} r{elsewhere[0].repeat}, which another job runs")
                continue
            lost = [dep for dep in self.plan.dependencies(job) if dep in report.failed or dep in report.blocked]
            if lost:
                report.blocked.append(job)
                self.echo(f"{tag}  BLOCKED ({lost[0].stage} failed)")
                continue
            if job in reasons:
                self.echo(f"{tag}  {reasons[job]}")
            self._run_one(job, tag, report, records)
        self.echo(f"local: {report.summary()}")
        return report

    def _queued_on_slurm(self, jobs: list[StageJob], checks: dict) -> dict[StageJob, slurm_queue.Standing]:
        """Jobs not complete whose latest SLURM job may still run (slurm_queue.Standing): queued,
        running, just submitted, or of a state the scheduler could not tell."""
        live = ask(Ledger.read(self.layout.store), [job for job in jobs if not checks[job].complete])
        if live.no_slurm_here:
            raise UsageError(f"{len(live.job_ids)} stage job(s) of this grid were submitted to SLURM, but no SLURM commands are here to "
                             "tell whether they still run; submit from the cluster, or cancel them there first")
        return live.require().may_still_run()

    def executor_parameters(self) -> dict:
        """One GPU per job where there is one, as each job has on the paper's cluster."""
        return {
            "timeout_min": self.timeout_min, "signal_delay_s": self.signal_delay_s,
            "gpus_per_node": 1 if self.gpus else 0, "visible_gpus": self.gpus[:1],
        }

    def _run_one(self, job: StageJob, tag: str, report: SubmitReport, records: Records) -> None:
        folder = self.layout.store.job(job)
        executor = submitit.LocalExecutor(folder=folder.jobs, max_num_timeout=DEFAULT_MAX_REQUEUES)
        executor.update_parameters(**self.executor_parameters())
        self.echo(f"{tag}  running")
        started = time.perf_counter()
        bar = MeterBar(folder, tag.split("]")[0] + "]") if bars_wanted() else None
        handle = None
        try:
            for start in range(CONTROLLER_RUNS):
                handle = self._start(executor, job)
                while not handle.done():
                    if bar:
                        bar.refresh()
                    time.sleep(0.2)
                if handle.paths.result_pickle.exists() or not resumable(folder) or start == CONTROLLER_RUNS - 1:
                    break
                # submitit's local controller starts a job at most 6 times, whatever its
                # max_num_timeout; a training that needs more time-limited runs goes on here.
                self.echo(f"{tag}  stopped at its time limit after the local controller's last restart; starting it again")
            if bar:
                bar.close()
            handle.result()
        except KeyboardInterrupt:
            if handle is not None:
                handle.cancel(check=False)
            raise
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            report.failed.append(job)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            self.echo(f"{tag}  FAILED after {time.perf_counter() - started:.1f}s: {reason[:200]}")
            self.echo(f"{' ' * len(tag)}  log: {handle.paths.stderr}")
            return
        records.forget()
        check = records.check(job)
        if not check.complete:  # e.g. the package changed under a running grid
            report.failed.append(job)
            self.echo(f"{tag}  FAILED: its result record is {check.state}: {check.reason}")
            return
        report.ran.append(job)
        self.echo(f"{tag}  done in {time.perf_counter() - started:.1f}s  {headline(check.record)}")

    def _start(self, executor: submitit.LocalExecutor, job: StageJob) -> submitit.Job:
        with _environment(job_environment()):  # the job's process copies this one's environment at its start
            return executor.submit(stage_job_entry, str(self.layout.runs_root), job.stage, job.key, job.repeat)


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in this process while the block runs, then as they were. (submitit's
    `setup` lines would put a shell between the job and the signals that stop it.)"""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
