"""Local backend: the stage graph on this machine, in dependency order, one job at a time.

Each job runs in its own process through submitit's LocalExecutor, as it would on a node:
its peak memory is its own and its log lands beside its result.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import submitit

from dpr_hpc.backends.report import SubmitReport
from dpr_hpc.errors import ResultInvalidError, UsageError
from dpr_hpc.layout import RunLayout
from dpr_hpc.locks import HEARTBEAT_S, LockFile, LockHeldError, describe_holder
from dpr_hpc.plan import Plan, StageJob
from dpr_hpc.results import is_complete, load_record
from dpr_hpc.runstate import save_plan
from dpr_hpc.stages.runner import stage_job_entry
from dpr_hpc.status import headline

DEFAULT_TIMEOUT_MIN = 48 * 60  # the cluster's job limit, the same bound here
DEFAULT_SIGNAL_DELAY_S = 300
# submitit's local controller restarts a requeued job at most 6 times whatever this says; a
# resubmit continues from the checkpoint after that.
DEFAULT_MAX_REQUEUES = 20


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
    ) -> None:
        """`timeout_min` is each job's time limit: as on SLURM, a job gets the warning signal
        `signal_delay_s` before it, a training checkpoints and is restarted from there."""
        self.layout = layout
        self.plan = plan
        self.echo = echo
        self.timeout_min = timeout_min
        self.signal_delay_s = min(signal_delay_s, max(1, int(timeout_min * 60) - 1))
        self.gpus = visible_gpus()

    def submit(self, grid_file: Path) -> SubmitReport:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        lock = LockFile(self.layout.submit_lock, purpose="local submit", heartbeat_s=HEARTBEAT_S)
        try:
            lock.acquire()
        except LockHeldError as exc:
            raise UsageError(f"{self.layout.root}: another submit is running on this run folder ({describe_holder(exc.holder)})") from None
        try:
            save_plan(self.layout, self.plan, grid_file)
            return self._run_all()
        finally:
            lock.release()

    def _run_all(self) -> SubmitReport:
        report = SubmitReport()
        jobs = list(self.plan.jobs())
        width = len(str(len(jobs)))
        for number, job in enumerate(jobs, start=1):
            tag = f"[{number:>{width}}/{len(jobs)}] {job.stage:<5} r{job.repeat} {job.cell_id}"
            cell = self.plan.cell(job.cell_id)
            if is_complete(self.layout.stage(job).result, cell, job):
                report.skipped.append(job)
                continue
            lost = [dep for dep in self.plan.dependencies(job) if dep in report.failed or dep in report.blocked]
            if lost:
                report.blocked.append(job)
                self.echo(f"{tag}  BLOCKED ({lost[0].stage} failed)")
                continue
            self._run_one(job, tag, report)
        self.echo(f"local: {report.summary()}")
        return report

    def executor_parameters(self) -> dict:
        """One GPU per job where there is one, as each job has on the paper's cluster."""
        return {
            "timeout_min": self.timeout_min, "signal_delay_s": self.signal_delay_s,
            "gpus_per_node": 1 if self.gpus else 0, "visible_gpus": self.gpus[:1],
        }

    def _run_one(self, job: StageJob, tag: str, report: SubmitReport) -> None:
        paths = self.layout.stage(job)
        executor = submitit.LocalExecutor(folder=paths.jobs, max_num_timeout=DEFAULT_MAX_REQUEUES)
        executor.update_parameters(**self.executor_parameters())
        self.echo(f"{tag}  running")
        started = time.perf_counter()
        handle = executor.submit(stage_job_entry, str(self.layout.root), job.cell_id, job.stage, job.repeat)
        try:
            while not handle.done():
                time.sleep(0.2)
            handle.result()
        except KeyboardInterrupt:
            handle.cancel(check=False)
            paths.running.unlink(missing_ok=True)
            raise
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            report.failed.append(job)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            self.echo(f"{tag}  FAILED after {time.perf_counter() - started:.1f}s: {reason[:200]}")
            self.echo(f"{' ' * len(tag)}  log: {handle.paths.stderr}")
            return
        try:
            record = load_record(paths.result, self.plan.cell(job.cell_id), job)
        except ResultInvalidError as exc:  # e.g. the package changed under a running grid
            report.failed.append(job)
            self.echo(f"{tag}  FAILED: its result record is not valid: {exc}")
            return
        report.ran.append(job)
        self.echo(f"{tag}  done in {time.perf_counter() - started:.1f}s  {headline(record)}")
