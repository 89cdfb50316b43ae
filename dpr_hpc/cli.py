"""dpr-hpc's command line. Exit codes: 0 success, 1 a stage job failed (or the scheduler did
not answer), 2 bad input, 3 a submit that left jobs deferred by the cluster's submit limit."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dpr_hpc.errors import DprHpcError, GridError, UsageError
from dpr_hpc.layout import DEFAULT_RUNS_ROOT, RunLayout

if TYPE_CHECKING:
    from dpr_hpc.plan import Plan
# A submit that queued what it could but had to defer jobs over the cluster's submit limit:
# not a failure, not done either (scripts that loop on submit wait on this code).
EXIT_DEFERRED = 3

DESCRIPTION = """\
Run the grid of "Improving Efficiency in Dense Passage Retrieval" (DPR bi-encoders with BERT,
DistilBERT, TinyBERT and ELECTRA at several embedding sizes) as batch jobs: every grid cell
becomes a train, an index and an infer stage job, each writing a result record tagged with
the node it ran on; collect merges them into the paper's tables.

typical use:
  dpr-hpc plan jobs/paper.yaml          what would run, nothing started
  dpr-hpc submit jobs/paper.yaml        run every stage not yet complete
  dpr-hpc status                        where every cell and stage stands
  dpr-hpc collect --median              one table, medians over repeats
  dpr-hpc report jobs/paper.yaml        tables, figures, node variance and cost in results/paper/
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DprHpcError as error:
        print(f"dpr-hpc: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dpr-hpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpr-hpc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runs_root = argparse.ArgumentParser(add_help=False)
    runs_root.add_argument(
        "--runs-root", type=Path, default=Path(os.environ.get("DPR_HPC_RUNS", DEFAULT_RUNS_ROOT)),
        help="folder holding one run folder per grid name (default: $DPR_HPC_RUNS or ./runs)",
    )

    plan = commands.add_parser(
        "plan", parents=[runs_root], help="print the cells and stage jobs a grid expands to; runs nothing",
        description="Expand a grid into cells and stage jobs. Cells that agree on a stage's identity share its job "
        "(one training for an ef_search sweep); a job whose output is already in the store under --runs-root is marked "
        "as existing, whichever grid made it.",
    )
    plan.add_argument("grid", type=Path, help="grid file (YAML)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=_plan)

    submit = commands.add_parser(
        "submit", parents=[runs_root], help="run every stage job of a grid that is not complete yet",
        description="Run every stage job whose result record is missing or invalid; complete ones are skipped, "
        "so running submit again resumes a grid.",
    )
    submit.add_argument("grid", type=Path, help="grid file (YAML)")
    submit.add_argument(
        "--backend", choices=("auto", "local", "slurm"), default="auto",
        help="slurm: sbatch every stage job and return at once; local: run them here, one at a time; "
        "auto (default): slurm where sbatch is on PATH, else local",
    )
    submit.add_argument(
        "--profile", type=Path,
        help="cluster profile with per-stage resources (see slurm_templates/); replaces the grid's slurm.profile, "
        "the grid's slurm.defaults/slurm.stages still apply on top; slurm only",
    )
    submit.add_argument("--retry-failed", action="store_true", help="resubmit stage jobs whose last SLURM job ended without a result")
    submit.add_argument("--hold", action="store_true", help="submit SLURM jobs held (release them with scontrol release)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch scripts submit would write; submit nothing")
    submit.add_argument(
        "--time-limit", type=float, metavar="MINUTES",
        help="local only: each job's time limit (default 2880, the cluster's 48 h). As on SLURM, a training "
        "gets a warning signal before it, checkpoints and restarts from there; on SLURM the profile's time applies",
    )
    submit.add_argument(
        "--signal-delay", type=int, metavar="SECONDS",
        help="local only: how long before --time-limit the warning signal comes (default 300)",
    )
    submit.set_defaults(handler=_submit)

    cancel = commands.add_parser("cancel", parents=[runs_root], help="cancel the queued and running SLURM jobs of a grid")
    cancel.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    cancel.add_argument("--cell", action="append", default=[], help="only this cell id (repeatable)")
    cancel.set_defaults(handler=_cancel)

    status = commands.add_parser("status", parents=[runs_root], help="show every cell x stage x repeat with its state")
    status.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    collect = commands.add_parser("collect", parents=[runs_root], help="merge result records into one table (CSV and Markdown)")
    collect.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    collect.add_argument("--median", action="store_true", help="one row per cell: median over repeats, with count and spread")
    collect.add_argument("--out", type=Path, default=Path("results"), help="where the CSV and Markdown files go (default: results/)")
    collect.add_argument("--json", action="store_true", help="print the table as JSON records instead of Markdown")
    collect.add_argument("--format", default="csv,md", help="files to write, several at once: csv,md,json (default: csv,md)")
    collect.add_argument("--columns", help="comma-separated columns to print (default: those of the paper's tables that fit the terminal)")
    collect.set_defaults(handler=_collect)

    report = commands.add_parser("report", parents=[runs_root],
                                 help="the paper's tables and figures, hardware variance and cost, as Markdown, PNG and HTML")
    report.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    report.add_argument("--out", type=Path, default=Path("results"), help="the report goes to OUT/<grid>/ (default: results/)")
    report.add_argument("--baseline", default="BERT-768",
                        help="the cell figures are relative to, as FAMILY-SIZE (default BERT-768; absolute figures where the grid has none)")
    report.add_argument("--variance-factor", type=float, default=1.5,
                        help="flag a timing repeat this many times slower or faster than its cell's median (default 1.5)")
    report.add_argument("--no-html", action="store_true", help="write report.md and the PNGs only")
    report.set_defaults(handler=_report)

    demo = commands.add_parser("generate-demo", help="write the offline demo's data, tokenizer and tiny models")
    demo.add_argument("out", type=Path, nargs="?", help="output folder (default: data/demo, or data/nq-shaped with --scale nq)")
    demo.add_argument("--scale", choices=["demo", "nq"], default="demo",
                      help="demo: the small demo with models; nq: DPR-format train and dev files shaped like NQ's (data only)")
    demo.add_argument("--fraction", type=float, help="with --scale nq: this fraction of NQ's question counts and pool, in (0, 1]")
    demo.set_defaults(handler=_generate_demo)

    bench = commands.add_parser(
        "bench", help="time this toolkit's encoding, training and search against the paper's way, on this node",
        description="Encoding and training throughput of our stage code vs the paper's (pad to 256, fp32), our FLOP rate "
        "against this machine's matrix-multiply peak, per-query search overhead vs bare FAISS, and the token cache. "
        "Uses a randomly initialised 6-layer, 384-wide BERT on NQ-like lengths; needs no download. Submit it to each "
        "node type of a cluster to see hardware variance: the output is tagged with the node.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes (a minute on 2 CPU cores); for a smoke test, not for figures")
    bench.add_argument("--out", type=Path, default=Path("results"), help="where the JSON report goes (default: results/)")
    bench.add_argument(
        "--control-path", action="store_true",
        help="instead: wall time of plan, status and a submit with every job already queued, on generated grids of "
        "100 and 2,000 cells (the scheduler's answers simulated); about a minute",
    )
    bench.add_argument(
        "--scale", action="store_true",
        help="instead: every stage phase (parse, prepare, map, tokenise, encode, HNSW M=512 build, search) on NQ-shaped data, "
        "each in its own process: wall time, peak RSS and disk, extrapolated to full NQ where a fraction ran "
        "(about 30 min and 7 GB of scratch on 2 CPU cores)",
    )
    bench.add_argument("--train-fraction", type=float, help="--scale: the share of NQ's 58,880 train questions generated (default 1.0)")
    bench.add_argument("--dev-fraction", type=float, help="--scale: the share of NQ's 935,159-passage dev pool generated (default 1.0)")
    bench.add_argument("--work", type=Path, help="--scale: keep the generated data, caches and indexes in this folder (default: a temporary one)")
    bench.set_defaults(handler=_bench)

    gpu_check = commands.add_parser(
        "gpu-check", help="the paper's GPU figures at real model sizes (batch size auto, gradient cache, PEI, TTT), memory capped at 24 GB",
        description="Randomly initialised encoders with the real shapes of bert-base, distilbert-base, electra-small and "
        "TinyBERT-4L-312 on NQ-like token lengths, the GPU capped at the paper's 24 GB: the batch size `auto` picks at max_length "
        "256, the gradient cache at batch 128 against the largest plain batch, PEI encoding and TTT extrapolated from a sample. "
        "Needs no download; --smoke runs tiny shapes on the CPU.",
    )
    gpu_check.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps, on the CPU: checks the script, measures nothing")
    gpu_check.add_argument("--budget-s", type=float, default=480.0, help="skip the measurements that would start after this many seconds (default 480)")
    gpu_check.add_argument("--out", type=Path, default=Path("results"), help="where the JSON report goes (default: results/)")
    gpu_check.set_defaults(handler=_gpu_check)
    return parser


def _plan(args: argparse.Namespace) -> int:
    from dpr_hpc.grid import load_grid
    from dpr_hpc.plan import StageJob, make_plan
    from dpr_hpc.results import Records

    grid = load_grid(args.grid, require_data=False)
    _check_checkpoints(grid)
    store = RunLayout.for_grid(grid.name, args.runs_root).store
    hashes = store.content_hashes() if store.root.is_dir() else None
    plan = make_plan(grid, hashes)
    records = Records(store, hashes)
    existing = {job for job in plan.jobs() if store.root.is_dir() and records.check(job).complete}
    if args.json:
        jobs = [{**job, "exists": StageJob(job["stage"], job["key"], job["repeat"]) in existing} for job in plan.to_json()["jobs"]]
        print(json.dumps({**plan.to_json(), "jobs": jobs, "missing_data": list(grid.missing_data)}, indent=2))
        return 0
    jobs = list(plan.jobs())
    counts = {stage: sum(1 for j in jobs if j.stage == stage) for stage in ("train", "index", "infer")}
    shared = sum(1 for j in jobs if len(plan.users(j)) > 1)
    print(f"grid {grid.name} ({args.grid}): {len(plan.cells)} cells, {len(jobs)} stage jobs "
          f"({counts['train']} train, {counts['index']} index, {counts['infer']} infer); "
          f"{shared} shared by several cells, {len(existing)} already in the store")
    rows = [
        [c.cell_id, c.group, c.encoder_label, str(c.embedding_size),
         str(c.batch_size or "-") + (f" (chunks of {c.grad_cache.chunk_size})" if c.train and c.grad_cache.chunk_size else ""),
         f"{c.precision.train if c.train else '-'}/{c.precision.encode}",
         " ".join(f"{s}x{c.repeats.of(s)}" for s in c.stages)]
        for c in plan.cells
    ]
    print(_columns(["CELL", "GROUP", "ENCODER", "ES", "BS", "PRECISION TRAIN/ENCODE", "STAGE JOBS"], rows))
    print()
    job_rows = [[j.stage, str(j.repeat), j.key, plan.users(j)[0] + (f" +{len(plan.users(j)) - 1} more" if len(plan.users(j)) > 1 else ""),
                 "exists" if j in existing else "to run"] for j in jobs]
    print(_columns(["STAGE", "R", "KEY", "CELLS", "STORE"], job_rows))
    _note_missing(grid.missing_data)
    _check_hub_models(grid, refuse=False)
    return 0


def _check_checkpoints(grid) -> None:
    """Load every encoder checkpoint of the grid that is here (a local folder, or a hub model in
    the Hugging Face cache) as its stage will, so a weight that does not load stops the grid
    before the queue wait, not in the stage job."""
    from dpr_hpc.modeling.hub import checkpoint_here

    here: dict[str, tuple[str, str]] = {}  # each checkpoint once, with the first place that names it
    for cell in grid.cells:
        for key in ("question_encoder", "passage_encoder"):
            path = cell.model_path(getattr(cell, key))
            if path not in here and checkpoint_here(path):  # absent local folders are listed as missing data
                here[path] = (cell.group, key)
    if not here:
        return  # nothing to load: plan stays free of torch's import time
    from dpr_hpc.modeling.encoder import CheckpointError, check_checkpoint
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    for path, (group, key) in here.items():
        try:
            check_checkpoint(path)
        except CheckpointError as error:
            raise GridError(str(grid.path), f"block {group}, {key}", f"expected a checkpoint whose every weight loads; {error}") from None


def _local_limits(args: argparse.Namespace) -> dict[str, float]:
    limits: dict[str, float] = {}
    if args.time_limit is not None:
        if not (math.isfinite(args.time_limit) and args.time_limit > 0):
            raise UsageError(f"--time-limit: expected a positive number of minutes, got {args.time_limit:g}")
        limits["timeout_min"] = args.time_limit
    if args.signal_delay is not None:
        if args.signal_delay < 1:
            raise UsageError(f"--signal-delay: expected a positive number of seconds, got {args.signal_delay}")
        limits["signal_delay_s"] = args.signal_delay
    return limits


def _note_left_out(table) -> None:
    """Notes wrapped to the terminal, so that the table's width promise holds for them too."""
    width = max(40, _terminal_width())
    left_out = table.attrs.get("left_out", [])
    if left_out:
        note = f"note: {len(left_out)} stage record(s) left out of the table, not complete; submit the grid again to rerun them:"
        print("\n".join(textwrap.wrap(note, width)), file=sys.stderr)
        for line in left_out:
            print("\n".join(textwrap.wrap(line, width, initial_indent="  ", subsequent_indent="    ")), file=sys.stderr)
    if table.attrs.get("left_cells"):
        print("\n".join(textwrap.wrap(f"note: {table.attrs['left_cells']}", width)), file=sys.stderr)


def _shown_path(path: Path) -> str:
    """A written file as the user would type it: relative to here where it lies below."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _terminal_width() -> int:
    from dpr_hpc.collect import terminal_width

    return terminal_width()


def _note_missing(missing_files: Sequence[str]) -> None:
    for missing in missing_files:
        print(f"note: not found here (needed before submit): {missing}", file=sys.stderr)


def _check_hub_models(grid, refuse: bool) -> None:
    """Hub models absent from the local Hugging Face cache: a note, or with `refuse` (a real
    submit) and the hub offline, a grid error, since every job would fail after its queue wait."""
    from dpr_hpc.errors import GridError
    from dpr_hpc.modeling.hub import hub_cache_dir, hub_offline, uncached

    missing = uncached(model for cell in grid.cells for model in cell.hub_models)
    offline = hub_offline()
    if missing and offline and refuse:
        group = next(cell.group for cell in grid.cells if missing[0] in cell.hub_models)
        raise GridError(str(grid.path), f"block {group}: encoder", f"hub model {missing[0]} is not in the local Hugging Face cache "
                        f"({hub_cache_dir()}) and the hub is offline (HF_HUB_OFFLINE); download it where the hub is reachable, or set HF_HOME to a cache that has it")
    for model in missing:
        after = "offline (HF_HUB_OFFLINE): submit refuses it" if offline else "downloaded on first use where the hub is reachable"
        print(f"note: hub model {model} is not in the local Hugging Face cache ({hub_cache_dir()}); {after}", file=sys.stderr)


def _submit(args: argparse.Namespace) -> int:
    from dpr_hpc.backends import scheduler
    from dpr_hpc.backends.local import LocalBackend
    from dpr_hpc.backends.profile import grid_resources
    from dpr_hpc.backends.slurm import SlurmBackend
    from dpr_hpc.grid import load_grid
    from dpr_hpc.plan import make_plan

    backend = args.backend
    if backend == "auto":
        backend = "slurm" if args.dry_run or scheduler.slurm_available() else "local"
    if backend == "local" and (args.profile or args.hold or args.dry_run or args.retry_failed):
        raise UsageError("--profile, --hold, --dry-run and --retry-failed apply to the slurm backend only")
    if backend == "slurm" and (args.time_limit is not None or args.signal_delay is not None):
        raise UsageError("--time-limit and --signal-delay apply to the local backend only; on SLURM set time and signal_delay_s in the profile")
    grid = load_grid(args.grid, require_data=not args.dry_run)
    _check_checkpoints(grid)
    resources = grid_resources(grid, args.profile)
    layout = RunLayout.for_grid(grid.name, args.runs_root)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    if args.dry_run:  # a dry run writes nothing, not even the content-hash memo
        slurm = SlurmBackend(layout, make_plan(grid), resources, echo)
        for job, script in slurm.dry_run():
            print(f"# ---- {job.id} (cell {slurm.plan.users(job)[0]})\n{script}")
        _note_missing(grid.missing_data)
        _check_hub_models(grid, refuse=False)
        return 0
    if backend == "slurm" and not scheduler.slurm_available():
        raise UsageError("--backend slurm: no sbatch on PATH here")
    local_limits = _local_limits(args) if backend == "local" else {}
    from dpr_hpc.runstate import bind_grid, check_binding

    check_binding(layout, args.grid)
    _check_hub_models(grid, refuse=True)
    bind_grid(layout, args.grid)
    plan = make_plan(grid, layout.store.content_hashes())
    if backend == "slurm":
        slurm = SlurmBackend(layout, plan, resources, echo, hold=args.hold, retry_failed=args.retry_failed)
    print(f"grid {grid.name}: {len(plan.cells)} cells, {len(list(plan.jobs()))} stage jobs -> {layout.root} ({backend})", flush=True)
    report = (slurm if backend == "slurm" else LocalBackend(layout, plan, echo=echo, **local_limits)).submit(args.grid)
    if not report.ok:
        return 1
    return EXIT_DEFERRED if report.deferred else 0


def _cancel(args: argparse.Namespace) -> int:
    from dpr_hpc.backends import scheduler
    from dpr_hpc.ledger import Ledger

    for layout, plan in _runs(args.target, args.runs_root):
        unknown = set(args.cell) - {c.cell_id for c in plan.cells}
        if unknown:
            raise UsageError(f"{layout.root}: no cell {sorted(unknown)[0]} in this run")
        cells = args.cell or [c.cell_id for c in plan.cells]
        jobs = {job for cell_id in cells for stage in plan.cell(cell_id).stages for job in plan.cell_jobs(cell_id, stage)}
        ledger = Ledger.read(layout.store)
        ids = {job.id: entry["job_id"] for job in jobs if (entry := ledger.latest(job))}
        view = scheduler.query(sorted(set(ids.values())), ledger.first_submission(), ledger.users())
        active = [job_id for job_id in ids.values() if job_id in view.jobs and view.jobs[job_id].active]
        scheduler.cancel(active)
        print(f"grid {plan.grid_name}: cancelled {len(active)} SLURM jobs")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dpr_hpc.status import stage_states, summary_line

    everything = []
    for layout, plan in _runs(args.target, args.runs_root):
        report = stage_states(layout, plan)
        states = report.states
        if args.json:
            everything.append({"grid": plan.grid_name, "run_dir": str(layout.root), "source": report.source,
                               "rows": [row.to_json() for row in report.rows], "summary": summary_line(states),
                               "left_cells": report.left_cells})
            continue
        print(f"grid {plan.grid_name} ({layout.root}); states from the {report.source}")
        rows = [
            [row.cell_id, s.job.stage, str(s.job.repeat), s.job.key[:8] + ("*" if row.shared_by > 1 else ""), s.state, s.job_id, s.node,
             s.detail + (f"  log: {s.log}" if s.state in ("FAILED", "TIMEOUT") and s.log else "")]
            for row in report.rows for s in [row.state]
        ]
        print(_columns(["CELL", "STAGE", "R", "KEY", "STATE", "JOB", "NODE", "DETAIL"], rows))
        print(summary_line(states) + ("  (KEY*: a job shared by several cells)" if any(r.shared_by > 1 for r in report.rows) else ""))
        if report.left_cells:
            print(report.left_cells)
    if args.json:
        print(json.dumps(everything, indent=2))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from dpr_hpc.collect import collect_table, parse_formats, terminal_table, terminal_width, write_table

    formats = parse_formats(args.format)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    outputs = []
    for layout, plan in _runs(args.target, args.runs_root):
        table = collect_table(layout, plan, median=args.median)
        stem = f"{plan.grid_name}-median" if args.median else plan.grid_name
        paths = write_table(table, args.out, stem, formats)
        if args.json:
            outputs.append({"grid": plan.grid_name, "files": [str(p) for p in paths], "rows": json.loads(table.to_json(orient="records"))})
            continue
        print(f"grid {plan.grid_name}: {len(table)} rows ->")
        for path in paths:
            print(f"  {_shown_path(path)}")
        print(terminal_table(table, terminal_width(), columns))
        _note_left_out(table)
    if args.json:
        print(json.dumps(outputs, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from dpr_hpc.report import ReportOptions, write_report

    options = ReportOptions(baseline=args.baseline, variance_factor=args.variance_factor, html=not args.no_html)
    for layout, plan in _runs(args.target, args.runs_root):
        written = write_report(layout, plan, args.out / plan.grid_name, options)
        print(f"grid {plan.grid_name}: report -> {', '.join(str(p) for p in written)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dpr_hpc.benchmark import goals, run_benchmark
    from dpr_hpc.stages.runner import fit_threads_to_allocation, quiet_libraries

    quiet_libraries()
    fit_threads_to_allocation()
    if args.scale:
        return _bench_scale(args)
    if (args.train_fraction, args.dev_fraction, args.work) != (None, None, None):
        raise UsageError("--train-fraction, --dev-fraction and --work go with --scale")
    if args.control_path:
        from dpr_hpc.bench_control import run_control_benchmark

        report = run_control_benchmark(echo=lambda line: print(line, flush=True))
        _write_report(report, args.out, "bench-control")
        return 0
    report = run_benchmark(quick=args.quick, echo=lambda line: print(line, flush=True))
    report["goals"] = [{"goal": goal, "met": met, "measured": measured} for goal, met, measured in goals(report)]
    _print_goals(report["goals"])
    _write_report(report, args.out, "bench")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dpr_hpc.bench_scale import FULL_CPU, QUICK, hnsw_summary, run_scale_benchmark, table

    size = QUICK if args.quick else FULL_CPU
    for flag, value in (("--train-fraction", args.train_fraction), ("--dev-fraction", args.dev_fraction)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag} {value}: expected a fraction in (0, 1]")
    size = replace(size, train_fraction=args.train_fraction or size.train_fraction, dev_fraction=args.dev_fraction or size.dev_fraction)
    report = run_scale_benchmark(size, args.work, echo=lambda line: print(line, flush=True))
    print()
    print(table(report))
    print(hnsw_summary(report))
    _print_goals(report["goals"])
    _write_report(report, args.out, "bench-scale")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from dpr_hpc.gpu_check import run_gpu_check
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    report = run_gpu_check(smoke=args.smoke, budget_s=args.budget_s, echo=lambda line: print(line, flush=True))
    _write_report(report, args.out, "gpu-check-smoke" if args.smoke else "gpu-check")
    return 0


def _print_goals(rows: list[dict]) -> None:
    print()
    for row in rows:
        extrapolated = " (extrapolated)" if row.get("extrapolated") else ""
        print(f"  {'met    ' if row['met'] else 'NOT met'}  {row['goal']:<46} {row['measured']}{extrapolated}")


def _write_report(report: dict, out_dir: Path, kind: str) -> Path:
    """`<kind>-<node>-<UTC time>.json` under out_dir: every benchmark's report, tagged with its node
    (and, on a GPU, named after the node the GPU sits in; the GPU's name is in the report's tags)."""
    from dpr_hpc.fsutil import write_json_atomic
    from dpr_hpc.provenance import node_label

    stamp = report["started_at"].replace(":", "").replace("-", "")[:15]
    out = out_dir / f"{kind}-{node_label(report['node'])}-{stamp}.json"
    write_json_atomic(out, report)
    print(f"report: {out}")
    return out


def _generate_demo(args: argparse.Namespace) -> int:
    if args.scale == "nq":
        return _generate_nq_shaped(args)
    if args.fraction is not None:
        raise UsageError("--fraction: only with --scale nq")
    from dpr_hpc.demo.generate import generate_demo
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    summary = generate_demo(args.out or Path("data/demo"))
    print(f"demo data in {args.out}: {summary['train']} training questions, {summary['dev']} dev questions, "
          f"{summary['passages']} passages; models: {', '.join(summary['models'])}")
    return 0


def _generate_nq_shaped(args: argparse.Namespace) -> int:
    from dpr_hpc.demo.nq_shape import NQ_DEV_POOL_WITH_DUPLICATES, NQ_DEV_QUESTIONS, NQ_TRAIN_QUESTIONS, write_nq_shaped

    fraction = 1.0 if args.fraction is None else args.fraction
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction: expected a number in (0, 1], got {fraction}")
    out = args.out or Path("data/nq-shaped")
    summary = write_nq_shaped(out, fraction)
    nq = {"train": (NQ_TRAIN_QUESTIONS, None), "dev": (NQ_DEV_QUESTIONS, NQ_DEV_POOL_WITH_DUPLICATES)}
    print(f"NQ-shaped data in {out} (fraction {fraction:g} of NQ):")
    for split, (questions, pool) in nq.items():
        written = summary[split]
        pool_text = f", pool {written['pool_with_duplicates']:,} with duplicates (NQ {pool:,})" if pool else ""
        print(f"  {split}.json: {written['records']:,} questions (NQ {questions:,}), {written['contexts']:,} contexts"
              f"{pool_text}, {written['bytes'] / 1e9:.2f} GB")
    return 0


def _runs(target: str | None, runs_root: Path) -> list[tuple[RunLayout, "Plan"]]:
    from dpr_hpc.runstate import runs_for

    return runs_for(target, runs_root)


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def _version() -> str:
    from dpr_hpc import __version__

    return __version__
