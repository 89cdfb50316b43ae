"""What a run folder records besides results: the plan, each cell's config, and the markers a
stage job leaves while it runs or after it fails. Status reads these; jobs read their cell here."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from dpr_hpc.errors import UsageError
from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.grid.config import cell_from_json
from dpr_hpc.grid import CellConfig
from dpr_hpc.layout import RunLayout, StagePaths
from dpr_hpc.plan import Plan
from dpr_hpc.provenance import now_iso


def save_plan(layout: RunLayout, plan: Plan, grid_file: Path) -> None:
    """Record the plan and every cell's config. A cell's results never change (its id hashes
    them), but settings outside the hash (checkpoint intervals, the grid's folder) may."""
    for cell in plan.cells:
        cell_file = layout.cell_dir(cell.cell_id) / "cell.json"
        if read_marker(cell_file) != cell.to_json():
            write_json_atomic(cell_file, cell.to_json())
    write_json_atomic(layout.plan_file, {**plan.to_json(), "grid_file": str(Path(grid_file).resolve()), "saved_at": now_iso()})


def load_plan(layout: RunLayout) -> Plan:
    if not layout.plan_file.is_file():
        raise UsageError(f"{layout.root}: no plan.json here; run 'dpr-hpc submit GRID' first")
    try:
        saved = read_json(layout.plan_file)
        return Plan(saved["grid"], tuple(cell_from_json(c) for c in saved["cells"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{layout.plan_file}: damaged ({type(exc).__name__}: {exc}); 'dpr-hpc submit GRID' writes it again") from None


def load_cell(layout: RunLayout, cell_id: str) -> CellConfig:
    return cell_from_json(read_json(layout.cell_dir(cell_id) / "cell.json"))


def mark_running(paths: StagePaths) -> None:
    paths.failure.unlink(missing_ok=True)
    paths.interrupted.unlink(missing_ok=True)
    write_json_atomic(paths.running, {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")})


def mark_failed(paths: StagePaths, error: BaseException) -> None:
    write_json_atomic(paths.failure, {"error": f"{type(error).__name__}: {error}", "finished_at": now_iso(), "host": socket.gethostname()})


def mark_interrupted(paths: StagePaths, reason: str) -> None:
    """Stopped by a signal after writing a checkpoint: not a failure, the next job resumes it."""
    write_json_atomic(paths.interrupted, {"reason": reason, "finished_at": now_iso(), "host": socket.gethostname()})


def resumable(paths: StagePaths) -> bool:
    """Stopped by a signal (time limit with its requeues spent, scancel) after saving its state,
    and not failed: submitting it again continues it rather than repeating a failure."""
    return paths.interrupted.exists() and not paths.failure.exists()


def latest_log(paths: StagePaths) -> Path | None:
    """The newest job log (submitit names them <job id>_<task>_log.{out,err})."""
    logs = sorted(paths.jobs.glob("*_log.err"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None
