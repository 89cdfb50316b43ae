"""How the command line shows what the service layer (dpr_hpc.api) returns: aligned columns,
status lines, the redrawn `status --watch`, notes on stderr and the terminal table. Nothing
here decides what runs; it prints."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import pandas as pd

    from dpr_hpc.api import CancelReport, GridNotes, PlanReport, RunStatus, SubmitReport


def echo(line: str) -> None:
    """The progress callback of every command: each line as it comes (a long submit's log)."""
    print(line, flush=True)


def columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def plan_text(planned: "PlanReport", shown_as: Path) -> str:
    """`dpr-hpc plan`: a summary line, the cells, then the stage jobs with their store state."""
    jobs, plan = planned.jobs, planned.plan
    counts = dict.fromkeys(("train", "index", "infer"), 0)  # always named; corpus stages only where planned
    for job in jobs:
        counts[job.stage] = counts.get(job.stage, 0) + 1
    shared = sum(1 for j in jobs if len(plan.users(j)) > 1)
    head = (f"grid {planned.name} ({shown_as}): {len(plan.cells)} cells, {len(jobs)} stage jobs "
            f"({', '.join(f'{n} {stage}' for stage, n in counts.items())}); "
            f"{shared} shared by several cells, {len(planned.existing)} already in the store")
    rows = [
        [c.cell_id, c.group, c.encoder_label, str(c.embedding_size),
         str(c.batch_size or "-") + (f" (chunks of {c.grad_cache.chunk_size})" if c.train and c.grad_cache.chunk_size else ""),
         f"{c.precision.train if c.train else '-'}/{c.precision.encode}",
         " ".join(f"{s}x{len(plan.cell_jobs(c.cell_id, s))}" for s in c.stages)]
        for c in plan.cells
    ]
    job_rows = [[j.stage, str(j.repeat), j.key, plan.users(j)[0] + (f" +{len(plan.users(j)) - 1} more" if len(plan.users(j)) > 1 else ""),
                 "exists" if j in planned.existing else "to run"] for j in jobs]
    return "\n".join([head, columns(["CELL", "GROUP", "ENCODER", "ES", "BS", "PRECISION TRAIN/ENCODE", "STAGE JOBS"], rows), "",
                      columns(["STAGE", "R", "KEY", "CELLS", "STORE"], job_rows)])


def grid_notes(notes: "GridNotes") -> None:
    """On stderr: the data files and hub models a submit needs that are not here."""
    for missing in notes.missing_data:
        print(f"note: not found here (needed before submit): {missing}", file=sys.stderr)
    for model in notes.uncached_models:
        print(f"note: hub model {model} is not in the local Hugging Face cache ({notes.hub_cache}); "
              f"'dpr-hpc prefetch {notes.grid_path}' downloads it (submit does too, where the hub is reachable)", file=sys.stderr)


def dry_run(report: "SubmitReport") -> None:
    for job, cell_id, script in report.scripts:
        print(f"# ---- {job.id} (cell {cell_id})\n{script}")
    if report.notes:
        grid_notes(report.notes)


def turned_stale(report: "SubmitReport") -> None:
    stale = report.turned_stale
    if stale:
        print(f"note: {len(stale)} stage job(s) outside the selection read a forced job's output and are STALE now "
              f"({', '.join(j.short for j in stale[:3])}{' ...' if len(stale) > 3 else ''}); collect leaves them out until "
              "they are submitted again", flush=True)


def cancelled(report: "CancelReport") -> None:
    for problem in report.unreadable:
        print(f"warning: {problem}; the jobs that run shares with this grid are not known, so none of them is kept", file=sys.stderr)
    for grid in report.grids:
        print(f"grid {grid.grid}: cancelled {len(grid.cancelled)} SLURM jobs")
        for job, job_id in grid.kept.items():
            print(f"  kept {job.stage} {job.key[:8]} r{job.repeat} (SLURM job {job_id}): grid(s) "
                  f"{', '.join(grid.sharing[job])} plan it too; --include-shared cancels it as well")
        if grid.unknown:
            print(f"warning: SLURM job(s) {', '.join(grid.unknown)} not cancelled: sacct has not listed them and squeue did not "
                  "answer, so whether they still run is unknown; run cancel again", file=sys.stderr)


def status_json(runs: "list[RunStatus]") -> str:
    from dpr_hpc.tracking.status import array_lines, summary_line

    return json.dumps([{"grid": run.plan.grid_name, "run_dir": str(run.layout.root), "source": run.report.source,
                        "rows": [row.to_json() for row in run.report.rows], "summary": summary_line(run.report.states),
                        "arrays": array_lines(run.plan, run.report), "left_cells": run.report.left_cells} for run in runs], indent=2)


def status_lines(run: "RunStatus", verbose: bool = False) -> list[str]:
    """The status table; a job array's tasks are counted on one line per array under it, with a
    line for each task that ended without a result (`verbose`: a row for every task too)."""
    from dpr_hpc.tracking.status import array_lines, array_members, summary_line

    report = run.report
    hidden = frozenset() if verbose else array_members(run.plan)
    rows = [
        [row.cell_id, s.job.stage, str(s.job.repeat), "" if s.attempt is None else str(s.attempt),
         s.job.key[:8] + ("*" if row.shared_by > 1 else ""), s.state, s.job_id, s.node,
         s.detail + (f"  log: {s.log}" if s.state in ("FAILED", "TIMEOUT") and s.log else "")]
        for row in report.rows for s in [row.state] if s.job not in hidden
    ]
    lines = [f"grid {run.plan.grid_name} ({run.layout.root}); states from the {report.source}",
             columns(["CELL", "STAGE", "R", "A", "KEY", "STATE", "JOB", "NODE", "DETAIL"], rows), *array_lines(run.plan, report),
             summary_line(report.states) + ("  (KEY*: a job shared by several cells)" if any(r.shared_by > 1 for r in report.rows) else "")]
    return lines + ([report.left_cells] if report.left_cells else [])


def watch(read: "Callable[[], list[RunStatus]]", every_s: float) -> None:
    """Redraw status in place (cursor up, clear to the end of the screen: plain ANSI) on a
    terminal; elsewhere print the summary line each time it changes. Ends by itself once no
    selected job is queued or running and no local submit works on the run."""
    from dpr_hpc.tracking.status import summary_line

    redraw = sys.stdout.isatty()
    drawn, last_summary = 0, None
    while True:
        runs = read()
        lines = [line for run in runs for line in status_lines(run)]
        summary = "; ".join(summary_line(run.report.states) for run in runs)
        active = any(run.active for run in runs)
        if redraw:  # lines cut to the width, so that each takes one row and the cursor goes back up exactly
            width = shutil.get_terminal_size((80, 24)).columns
            screen = [row[: width - 1] for line in lines for row in line.split("\n")]
            print((f"\x1b[{drawn}A\r\x1b[J" if drawn else "") + "\n".join(screen), flush=True)
            drawn = len(screen)
        elif active and summary != last_summary:
            print(summary, flush=True)
        last_summary = summary
        if not active:
            if not redraw:
                print("\n".join(lines), flush=True)
            return
        time.sleep(every_s)


def collected(grid: str, table: "pd.DataFrame", files: list[Path], shown_columns: list[str] | None) -> None:
    from dpr_hpc.reporting.collect import terminal_table, terminal_width

    print(f"grid {grid}: {len(table)} rows ->")
    for path in files:
        print(f"  {shown_path(path)}")
    print(terminal_table(table, terminal_width(), shown_columns))
    note_left_out(table)


def note_left_out(table: "pd.DataFrame") -> None:
    """Notes wrapped to the terminal, so that the table's width promise holds for them too."""
    from dpr_hpc.reporting.collect import terminal_width

    width = max(40, terminal_width())
    left_out = table.attrs.get("left_out", [])
    if left_out:
        note = f"note: {len(left_out)} stage record(s) left out of the table, not complete; submit the grid again to rerun them:"
        print("\n".join(textwrap.wrap(note, width)), file=sys.stderr)
        for line in left_out:
            print("\n".join(textwrap.wrap(line, width, initial_indent="  ", subsequent_indent="    ")), file=sys.stderr)
    if table.attrs.get("left_cells"):
        print("\n".join(textwrap.wrap(f"note: {table.attrs['left_cells']}", width)), file=sys.stderr)


def shown_path(path: Path) -> str:
    """A written file as the user would type it: relative to here where it lies below."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def goals(rows: list[dict]) -> None:
    print()
    for row in rows:
        extrapolated = " (extrapolated)" if row.get("extrapolated") else ""
        print(f"  {'met    ' if row['met'] else 'NOT met'}  {row['goal']:<46} {row['measured']}{extrapolated}")


def describe_os_error(error: OSError) -> str:
    """One line: the path (both, for a rename) and the system's reason, e.g.
    "runs/g/plan.json: No space left on device"."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
    text = f"{' -> '.join(paths)}: {reason}" if paths else f"{type(error).__name__}: {reason}"
    return " ".join(text.split())
