"""dpr-hpc's command line. Exit codes: 0 success, 1 a stage job failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from dpr_hpc.errors import DprHpcError, GridError, UsageError
from dpr_hpc.layout import DEFAULT_RUNS_ROOT, RunLayout

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

    plan = commands.add_parser("plan", help="print the cells and stage jobs a grid expands to; runs nothing")
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
    collect.set_defaults(handler=_collect)

    demo = commands.add_parser("generate-demo", help="write the offline demo's data, tokenizer and tiny models")
    demo.add_argument("out", type=Path, nargs="?", default=Path("data/demo"), help="output folder (default: data/demo)")
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
    bench.set_defaults(handler=_bench)
    return parser


def _plan(args: argparse.Namespace) -> int:
    from dpr_hpc.grid import load_grid
    from dpr_hpc.plan import make_plan

    grid = load_grid(args.grid, require_data=False)
    _check_checkpoints(grid)
    plan = make_plan(grid)
    if args.json:
        print(json.dumps({**plan.to_json(), "missing_data": list(grid.missing_data)}, indent=2))
        return 0
    jobs = list(plan.jobs())
    print(f"grid {grid.name} ({args.grid}): {len(plan.cells)} cells, {len(jobs)} stage jobs")
    rows = [
        [c.cell_id, c.group, c.encoder_label, str(c.embedding_size),
         str(c.batch_size or "-") + (f" (chunks of {c.grad_cache.chunk_size})" if c.train and c.grad_cache.chunk_size else ""),
         f"{c.precision.train if c.train else '-'}/{c.precision.encode}",
         " ".join(f"{s}x{c.repeats.of(s)}" for s in c.stages)]
        for c in plan.cells
    ]
    print(_columns(["CELL", "GROUP", "ENCODER", "ES", "BS", "PRECISION TRAIN/ENCODE", "STAGE JOBS"], rows))
    _note_missing(grid.missing_data)
    return 0


def _check_checkpoints(grid) -> None:
    """Load every encoder checkpoint of the grid that is here (a local folder, or a hub model in
    the Hugging Face cache) as its stage will, so a weight that does not load stops the grid
    before the queue wait, not in the stage job."""
    from dpr_hpc.modeling.hub_cache import checkpoint_here

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
        if not args.time_limit > 0:
            raise UsageError(f"--time-limit: expected a positive number of minutes, got {args.time_limit:g}")
        limits["timeout_min"] = args.time_limit
    if args.signal_delay is not None:
        if args.signal_delay < 1:
            raise UsageError(f"--signal-delay: expected a positive number of seconds, got {args.signal_delay}")
        limits["signal_delay_s"] = args.signal_delay
    return limits


def _note_missing(missing_files: Sequence[str]) -> None:
    for missing in missing_files:
        print(f"note: not found here (needed before submit): {missing}", file=sys.stderr)


def _submit(args: argparse.Namespace) -> int:
    from dpr_hpc.backends import scheduler
    from dpr_hpc.backends.local import LocalBackend
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
    resources = grid.resources(args.profile)
    plan = make_plan(grid)
    layout = RunLayout.for_grid(grid.name, args.runs_root)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    if backend == "slurm":
        slurm = SlurmBackend(layout, plan, resources, echo, hold=args.hold, retry_failed=args.retry_failed)
        if args.dry_run:
            for job, script in slurm.dry_run():
                print(f"# ---- {job.key}\n{script}")
            _note_missing(grid.missing_data)
            return 0
        if not scheduler.slurm_available():
            raise UsageError("--backend slurm: no sbatch on PATH here")
    print(f"grid {grid.name}: {len(plan.cells)} cells, {len(list(plan.jobs()))} stage jobs -> {layout.root} ({backend})", flush=True)
    report = (slurm if backend == "slurm" else LocalBackend(layout, plan, echo=echo, **_local_limits(args))).submit(args.grid)
    return 0 if report.ok else 1


def _cancel(args: argparse.Namespace) -> int:
    from dpr_hpc.backends import scheduler
    from dpr_hpc.ledger import Ledger
    from dpr_hpc.runstate import load_plan

    for layout in _layouts(args.target, args.runs_root):
        plan = load_plan(layout)
        unknown = set(args.cell) - {c.cell_id for c in plan.cells}
        if unknown:
            raise UsageError(f"{layout.root}: no cell {sorted(unknown)[0]} in this run")
        ids = {key: job_id for key, job_id in Ledger.read(layout).latest_ids().items() if not args.cell or key.split("/")[0] in args.cell}
        view = scheduler.query(list(ids.values()))
        active = [job_id for job_id in ids.values() if job_id in view.jobs and view.jobs[job_id].active]
        scheduler.cancel(active)
        print(f"grid {plan.grid_name}: cancelled {len(active)} SLURM jobs")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dpr_hpc.runstate import load_plan
    from dpr_hpc.status import stage_states, summary_line

    everything = []
    for layout in _layouts(args.target, args.runs_root):
        plan = load_plan(layout)
        report = stage_states(layout, plan)
        states = report.states
        if args.json:
            everything.append({"grid": plan.grid_name, "run_dir": str(layout.root), "source": report.source, "jobs": [s.to_json() for s in states], "summary": summary_line(states)})
            continue
        print(f"grid {plan.grid_name} ({layout.root}); states from the {report.source}")
        rows = [
            [s.job.cell_id, s.job.stage, str(s.job.repeat), s.state, s.job_id, s.node, s.detail + (f"  log: {s.log}" if s.state in ("FAILED", "TIMEOUT") and s.log else "")]
            for s in states
        ]
        print(_columns(["CELL", "STAGE", "R", "STATE", "JOB", "NODE", "DETAIL"], rows))
        print(summary_line(states))
    if args.json:
        print(json.dumps(everything, indent=2))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from dpr_hpc.collect import collect_table, markdown, write_table
    from dpr_hpc.runstate import load_plan

    outputs = []
    for layout in _layouts(args.target, args.runs_root):
        plan = load_plan(layout)
        table = collect_table(layout, plan, median=args.median)
        stem = f"{plan.grid_name}-median" if args.median else plan.grid_name
        csv_path, md_path = write_table(table, args.out, stem)
        if args.json:
            outputs.append({"grid": plan.grid_name, "csv": str(csv_path), "rows": json.loads(table.to_json(orient="records"))})
            continue
        print(f"grid {plan.grid_name}: {len(table)} rows -> {csv_path}, {md_path}")
        print(markdown(table))
    if args.json:
        print(json.dumps(outputs, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dpr_hpc.benchmark import goals, run_benchmark
    from dpr_hpc.fsutil import write_json_atomic
    from dpr_hpc.provenance import node_label
    from dpr_hpc.stages.runner import fit_threads_to_allocation, quiet_libraries

    quiet_libraries()
    fit_threads_to_allocation()
    report = run_benchmark(quick=args.quick, echo=lambda line: print(line, flush=True))
    report["goals"] = [{"goal": goal, "met": met, "measured": measured} for goal, met, measured in goals(report)]
    print()
    for row in report["goals"]:
        print(f"  {'met    ' if row['met'] else 'NOT met'}  {row['goal']:<34} {row['measured']}")
    stamp = report["started_at"].replace(":", "").replace("-", "")[:15]
    out = args.out / f"bench-{node_label(report['node'])}-{stamp}.json"
    write_json_atomic(out, report)
    print(f"report: {out}")
    return 0


def _generate_demo(args: argparse.Namespace) -> int:
    from dpr_hpc.demo.generate import generate_demo
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    summary = generate_demo(args.out)
    print(f"demo data in {args.out}: {summary['train']} training questions, {summary['dev']} dev questions, "
          f"{summary['passages']} passages; models: {', '.join(summary['models'])}")
    return 0


def _layouts(target: str | None, runs_root: Path) -> list[RunLayout]:
    """A grid file's run folder, a run folder given directly, or every run under the runs root."""
    if target is None:
        found = sorted(p.parent for p in Path(runs_root).glob("*/plan.json"))
        if not found:
            raise UsageError(f"no runs under {runs_root}; run 'dpr-hpc submit GRID' first or name a run folder")
        return [RunLayout(p.resolve()) for p in found]
    path = Path(target)
    if path.is_file():
        from dpr_hpc.grid import load_grid

        return [RunLayout.for_grid(load_grid(path, require_data=False).name, runs_root)]
    if (path / "plan.json").is_file():
        return [RunLayout(path.resolve())]
    raise UsageError(f"{target}: neither a grid file nor a run folder with plan.json")


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def _version() -> str:
    from dpr_hpc import __version__

    return __version__
