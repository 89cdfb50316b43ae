"""A stage job's logs for `dpr-hpc logs`: which files belong to which attempt, printed with a
header naming each file, and followed while the job is queued or running.

The logs are submitit's, one stdout and one stderr file per scheduler job, in the job's jobs/
folder (store.JobFolder.logs); each attempt lists the scheduler jobs that worked on it
(AttemptPaths.job_ids, written by the runner), so a training resumed by a second job shows
both of its logs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from dpr_hpc.errors import UsageError
from dpr_hpc.store.markers import read_marker
from dpr_hpc.store.paths import JobFolder

FOLLOW_POLL_S = 0.5


@dataclass(frozen=True)
class JobLog:
    job_id: str
    stdout: Path
    stderr: Path
    attempt: int | None  # None: the job listed no attempt (it stopped before it claimed one, or predates jobs.json)

    @property
    def files(self) -> tuple[Path, Path]:
        return self.stdout, self.stderr


def job_logs(folder: JobFolder) -> list[JobLog]:
    """Every log pair of a stage job, oldest first, each with the attempt it worked on."""
    attempt_of = {}
    for number in folder.attempt_numbers():
        noted = read_marker(folder.attempt(number).job_ids) or {}
        attempt_of.update({job_id: number for job_id in noted.get("job_ids", [])})
    return [JobLog(job_id, out, err, attempt_of.get(job_id)) for job_id, out, err in folder.logs()]


def latest_log(folder: JobFolder) -> Path | None:
    """The newest job log (submitit names them <job id>_<task>_log.{out,err}); an array task's
    link to a log its task has not written yet is not one."""
    logs = sorted((p for p in folder.jobs.glob("*_log.err") if p.exists()), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def chosen_logs(folder: JobFolder, attempt: int | None) -> list[JobLog]:
    """The logs of `attempt`, or by default of the newest job's attempt (every job that worked
    on it); the newest log alone when that job wrote no attempt."""
    logs = job_logs(folder)
    if attempt is None:
        if not logs:
            return []
        attempt = logs[-1].attempt
        return [log for log in logs if log.attempt == attempt] if attempt is not None else logs[-1:]
    if attempt not in folder.attempt_numbers():
        raise UsageError(f"--attempt {attempt}: {folder.dir} has attempts {_numbers(folder) or 'none'}")
    picked = [log for log in logs if log.attempt == attempt]
    if not picked:
        raise UsageError(f"--attempt {attempt}: no log names it (it ran before attempts listed their jobs); "
                         f"the job logs are in {folder.jobs}")
    return picked


class LogPrinter:
    """Prints what each file has that was not printed yet, under a `==> file <==` header
    whenever the file changes, as `tail` does with several files."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout  # looked up now, not at import: a caller may have redirected it
        self.offsets: dict[Path, int] = {}
        self.current: Path | None = None

    def pump(self, logs: list[JobLog]) -> None:
        for log in logs:
            for path in log.files:
                self._print_new(path, log.attempt)

    def _print_new(self, path: Path, attempt: int | None) -> None:
        try:
            with path.open("rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                data = handle.read()
        except FileNotFoundError:
            return
        if not data and path in self.offsets:
            return
        if path != self.current:
            shown = f"attempt {attempt}" if attempt is not None else "attempt not recorded"
            self.out.write(f"{chr(10) if self.current else ''}==> {path} ({shown}) <==\n")
            self.current = path
        self.offsets[path] = self.offsets.get(path, 0) + len(data)
        self.out.write(data.decode("utf-8", errors="replace"))
        self.out.flush()


def follow(folder: JobFolder, attempt: int | None, active: Callable[[], bool], printer: LogPrinter,
           poll_s: float = FOLLOW_POLL_S) -> None:
    """Print the logs, then what they gain, until the job is no longer queued or running (a
    new scheduler job of the attempt, a requeue, joins in); one last read after it ends."""
    while True:
        running = active()
        printer.pump(chosen_logs(folder, attempt))
        if not running:
            return
        time.sleep(poll_s)


def _numbers(folder: JobFolder) -> str:
    return ", ".join(str(n) for n in folder.attempt_numbers())
