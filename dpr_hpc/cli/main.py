"""dpr-hpc's command line. Exit codes: 0 success, 1 a stage job failed (or the scheduler did
not answer), 2 bad input, 3 a submit that left jobs deferred by the cluster's submit limit."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dpr_hpc.errors import DprHpcError, GridError, UsageError
from dpr_hpc.store.layout import DEFAULT_RUNS_ROOT, RunLayout
from dpr_hpc.planning.selection import STAGES, Selection, add_selection_flags

if TYPE_CHECKING:
    from dpr_hpc.planning.plan import Plan
# A submit that queued what it could but had to defer jobs over the cluster's submit limit:
# not a failure, not done either (scripts that loop on submit wait on this code).
EXIT_DEFERRED = 3
DEFAULT_WATCH_S = 5.0

DESCRIPTION = """\
Run the grid of "Improving Efficiency in Dense Passage Retrieval" (DPR bi-encoders with BERT,
DistilBERT, TinyBERT and ELECTRA at several embedding sizes) as batch jobs: every grid cell
becomes a train, an index and an infer stage job, each writing a result record tagged with
the node it ran on; collect merges them into the paper's tables.

typical use:
  dpr-hpc plan jobs/paper.yaml          what would run, nothing started
  dpr-hpc submit jobs/paper.yaml        run every stage not yet complete
  dpr-hpc status                        where every cell and stage stands (--watch: until nothing runs)
  dpr-hpc logs CELL -f                  a stage job's log, followed while it runs
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
    except OSError as error:
        # The file system refused (a full disk, a quota, a permission, an NFS hiccup): the file
        # and the reason are what the user acts on; a traceback would bury them.
        print(f"dpr-hpc: error: {describe_os_error(error)}", file=sys.stderr)
        return 1


def describe_os_error(error: OSError) -> str:
    """One line: the path (both, for a rename) and the system's reason, e.g.
    "runs/g/plan.json: No space left on device"."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
    text = f"{' -> '.join(paths)}: {reason}" if paths else f"{type(error).__name__}: {reason}"
    return " ".join(text.split())


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
    submit.add_argument("--exclude-node", metavar="NODES",
                        help="slurm only: keep the jobs this submit queues off these hosts (a hostlist, e.g. 'gpu[01-04],gpu07'); replaces the profile's exclude")
    submit.add_argument("--nodelist", metavar="NODES",
                        help="slurm only: run the jobs this submit queues on these hosts (a hostlist); replaces the profile's nodelist")
    add_selection_flags(submit, "The upstream jobs the selected ones need that are not complete run too.")
    submit.add_argument(
        "--force", action="store_true",
        help="rerun the selected stage jobs even when complete, as a new attempt; the earlier attempt stays on disk, "
        "and the jobs that read it turn STALE. Needs --cell, --group or --stage (or --force-all)",
    )
    submit.add_argument("--force-all", action="store_true", help="--force for every stage job of the grid")
    submit.set_defaults(handler=_submit)

    prefetch = commands.add_parser(
        "prefetch", parents=[runs_root], help="download every hub model a grid names into the Hugging Face cache, for offline nodes",
        description="Download every hub model and tokenizer the grid's encoders name (local folders are left alone) into "
        "the Hugging Face cache ($HF_HOME/hub, or $HF_HUB_CACHE) and pin each to a commit for every grid under --runs-root "
        "(store/hub-pins.json): the hub's main at the model's first use, or the commit pinned before. Each model's commit "
        "is recorded in the run folder's models.json. Run it on the login node: stage jobs run with HF_HUB_OFFLINE=1 and "
        "load exactly that commit from the same cache. A stage key names a hub model by its commit, so a pin moves only "
        "with --update.",
    )
    prefetch.add_argument("grid", type=Path, help="grid file (YAML)")
    prefetch.add_argument("--update", action="store_true",
                          help="fetch the hub's main now and move each pin to it; the stage jobs of a model whose commit "
                               "changed get new keys and run again at their next submit (earlier results stay in the store)")
    prefetch.set_defaults(handler=_prefetch)

    completion = commands.add_parser("completion", help="print a shell completion script for dpr-hpc's commands and flags",
                                     description="Enable with:  eval \"$(dpr-hpc completion bash)\"  (bash; zsh after 'autoload -U bashcompinit && bashcompinit')")
    completion.add_argument("shell", choices=("bash",), help="the shell the script is for")
    completion.set_defaults(handler=_completion)

    cancel = commands.add_parser("cancel", parents=[runs_root], help="cancel the queued and running SLURM jobs of a grid")
    cancel.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    add_selection_flags(cancel, "An exact cell id matches itself.")
    cancel.add_argument("--include-shared", action="store_true",
                        help="also cancel jobs that another grid under --runs-root plans too (by default they are kept "
                             "and named: one stage job serves every grid that plans it)")
    cancel.set_defaults(handler=_cancel)

    status = commands.add_parser("status", parents=[runs_root], help="show every cell x stage x repeat with its state")
    status.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_selection_flags(status, "The summary line counts the selected jobs only.")
    status.add_argument(
        "--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until nothing is queued or running, then print the summary line",
    )
    status.set_defaults(handler=_status)

    logs = commands.add_parser(
        "logs", parents=[runs_root], help="print a stage job's stdout and stderr; -f follows them while it runs",
        description="Print the log files of one stage job of one cell: the newest attempt's by default. CELL is a cell id "
        "or a glob that matches exactly one cell.",
    )
    logs.add_argument("cell", metavar="CELL", help="cell id, or a glob matching one cell")
    logs.add_argument("--grid", metavar="TARGET", help="grid file or run folder (default: every run under --runs-root)")
    logs.add_argument("--stage", choices=STAGES, help="default: the last stage of the cell that has a log")
    logs.add_argument("--repeat", type=int, default=0, help="the repeat (default 0)")
    logs.add_argument("--attempt", type=int, help="the store attempt (default: the newest); status shows it in column A")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the job writes until it is no longer queued or running")
    logs.set_defaults(handler=_logs)

    collect = commands.add_parser("collect", parents=[runs_root], help="merge result records into one table (CSV and Markdown)")
    collect.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    collect.add_argument("--median", action="store_true", help="one row per cell: median over repeats, with count and spread")
    collect.add_argument("--out", type=Path, default=Path("results"), help="where the CSV and Markdown files go (default: results/)")
    collect.add_argument("--json", action="store_true", help="print the table as JSON records instead of Markdown")
    collect.add_argument("--format", default="csv,md", help="files to write, several at once: csv,md,json (default: csv,md)")
    collect.add_argument("--columns", help="comma-separated columns to print (default: those of the paper's tables that fit the terminal)")
    add_selection_flags(collect, "--stage keeps the figures of those stages only.")
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
    report.add_argument("--paper", action="store_true",
                        help="add the paper's published figures (Tables 2-5) beside ours, with ours / the paper's, per cell")
    add_selection_flags(report, "Figures stay relative to the baseline even when it is not selected.")
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
    bench.add_argument("--compile", action="store_true",
                       help="also the encoders eager against compiled (torch.compile), side by side: compile time, encoding and "
                       "training speed, and the work from which compiling pays (what compute.compile: auto weighs)")
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
    from dpr_hpc.planning.plan import StageJob, make_plan
    from dpr_hpc.store.records import Records

    grid = load_grid(args.grid, require_data=False)
    _check_checkpoints(grid)
    store = RunLayout.for_grid(grid.name, args.runs_root).store
    hashes = store.content_hashes() if store.root.is_dir() else None
    plan = make_plan(grid, hashes)
    records = Records(store, hashes, plan)
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
    _check_hub_models(grid)
    return 0


def _check_checkpoints(grid) -> None:
    """Load every encoder checkpoint of the grid that is here (a local folder, or a hub model in
    the Hugging Face cache) as its stage will, so a weight that does not load stops the grid
    before the queue wait, not in the stage job."""
    from dpr_hpc.inputs.hub import checkpoint_here

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
    from dpr_hpc.reporting.collect import terminal_width

    return terminal_width()


def _note_missing(missing_files: Sequence[str]) -> None:
    for missing in missing_files:
        print(f"note: not found here (needed before submit): {missing}", file=sys.stderr)


def _check_hub_models(grid) -> None:
    """A note for each hub model absent from the local Hugging Face cache (plan, dry run)."""
    from dpr_hpc.inputs.hub import hub_cache_dir, uncached

    for model in uncached(model for cell in grid.cells for model in cell.hub_models):
        print(f"note: hub model {model} is not in the local Hugging Face cache ({hub_cache_dir()}); "
              f"'dpr-hpc prefetch {grid.path}' downloads it (submit does too, where the hub is reachable)", file=sys.stderr)


def _fetch_hub_models(grid, layout: RunLayout, update: bool) -> dict[str, str | None]:
    """Every hub model the grid names in the local cache at the commit its runs root pins,
    fetched where the cache lacks it, and pinned at its first use (with `update`, as
    `prefetch --update` does, at the hub's main now, moving the pin); recorded in the run
    folder's models.json. The stage jobs run offline. A model neither cached nor reachable is a
    grid error naming it."""
    from dpr_hpc.inputs.hub import HubPins, HubUnreachableError, hub_cache_dir, sync_pins
    from dpr_hpc.store.runs import record_hub_models

    models = list(dict.fromkeys(model for cell in grid.cells for model in cell.hub_models))
    pins_file = HubPins(layout.store.hub_pins_file)
    try:
        sync_pins(models, pins_file, update, echo=lambda line: print(line, flush=True))
    except HubUnreachableError as error:
        group = next(cell.group for cell in grid.cells if error.model in cell.hub_models)
        at = f" at its pinned commit {error.pinned} ({pins_file.path})" if error.pinned else ""
        raise GridError(str(grid.path), f"block {group}: encoder", f"hub model {error.model}{at} is neither in the local Hugging Face cache "
                        f"({hub_cache_dir()}) nor reachable: {error.reason}; run 'dpr-hpc prefetch' where the hub is reachable, "
                        "or set HF_HOME to a cache that has it") from None
    return record_hub_models(layout, models)


def _submit(args: argparse.Namespace) -> int:
    from dpr_hpc.tracking import slurm_queue
    from dpr_hpc.backends.local import LocalBackend
    from dpr_hpc.backends.profile import grid_resources
    from dpr_hpc.backends.slurm import SlurmBackend
    from dpr_hpc.grid import load_grid
    from dpr_hpc.grid.resources import with_nodes
    from dpr_hpc.planning.plan import make_plan

    backend = args.backend
    if backend == "auto":
        backend = "slurm" if args.dry_run or slurm_queue.slurm_available() else "local"
    if backend == "local" and (args.profile or args.hold or args.dry_run or args.retry_failed or args.exclude_node or args.nodelist):
        raise UsageError("--profile, --hold, --dry-run, --retry-failed, --exclude-node and --nodelist apply to the slurm backend only")
    if backend == "slurm" and (args.time_limit is not None or args.signal_delay is not None):
        raise UsageError("--time-limit and --signal-delay apply to the local backend only; on SLURM set time and signal_delay_s in the profile")
    selection = Selection.from_args(args)
    if args.force and selection.everything:
        raise UsageError("--force reruns complete jobs: pick them with --cell, --group or --stage, or pass --force-all to rerun the whole grid")
    grid = load_grid(args.grid, require_data=not args.dry_run)
    _check_checkpoints(grid)
    resources = with_nodes(grid_resources(grid, args.profile), args.exclude_node, args.nodelist, ("--exclude-node", "--nodelist"))
    layout = RunLayout.for_grid(grid.name, args.runs_root)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    if args.dry_run:  # a dry run writes nothing, not even the content-hash memo
        plan = make_plan(grid, layout.store.content_hashes(remember=False))
        targets = _submit_targets(plan, layout, selection, args, dry_run=True)
        slurm = SlurmBackend(layout, plan, resources, echo, only=targets.jobs if targets else None)
        for job, script in slurm.dry_run(frozenset(targets.forced) if targets else frozenset()):
            print(f"# ---- {job.id} (cell {slurm.plan.users(job)[0]})\n{script}")
        _note_missing(grid.missing_data)
        _check_hub_models(grid)
        return 0
    if backend == "slurm" and not slurm_queue.slurm_available():
        raise UsageError("--backend slurm: no sbatch on PATH here")
    local_limits = _local_limits(args) if backend == "local" else {}
    from dpr_hpc.store.runs import bind_grid, check_binding

    from dpr_hpc.inputs.hub import uncached

    check_binding(layout, args.grid)
    was_missing = uncached(model for cell in grid.cells for model in cell.hub_models)
    _fetch_hub_models(grid, layout, update=False)  # before the plan: a stage key names each model's pinned commit
    if was_missing:
        _check_checkpoints(grid)  # the models just downloaded have their weights checked too
    bind_grid(layout, args.grid)
    plan = make_plan(grid, layout.store.content_hashes())
    targets = _submit_targets(plan, layout, selection, args)
    only = targets.jobs if targets else None
    if backend == "slurm":
        slurm = SlurmBackend(layout, plan, resources, echo, hold=args.hold, retry_failed=args.retry_failed, only=only)
    picked = f" ({len(only)} selected: {selection.describe()})" if only is not None else ""
    print(f"grid {grid.name}: {len(plan.cells)} cells, {len(list(plan.jobs()))} stage jobs{picked} -> {layout.root} ({backend})", flush=True)
    report = (slurm if backend == "slurm" else LocalBackend(layout, plan, echo=echo, only=only, **local_limits)).submit(args.grid)
    if targets and targets.turned_stale:
        stale = targets.turned_stale
        print(f"note: {len(stale)} stage job(s) outside the selection read a forced job's output and are STALE now "
              f"({', '.join(j.short for j in stale[:3])}{' ...' if len(stale) > 3 else ''}); collect leaves them out until "
              "they are submitted again", flush=True)
    if not report.ok:
        return 1
    return EXIT_DEFERRED if report.deferred else 0


def _prefetch(args: argparse.Namespace) -> int:
    from dpr_hpc.grid import load_grid
    from dpr_hpc.store.runs import bind_grid, check_binding

    grid = load_grid(args.grid, require_data=False)
    layout = RunLayout.for_grid(grid.name, args.runs_root)
    check_binding(layout, args.grid)
    revisions = _fetch_hub_models(grid, layout, update=args.update)
    bind_grid(layout, args.grid)
    print(f"grid {grid.name}: {len(revisions)} hub model(s) pinned in {layout.store.hub_pins_file} and recorded in {layout.hub_models}")
    for model, revision in revisions.items():
        print(f"  {model}  {revision}")
    return 0


def _completion(args: argparse.Namespace) -> int:
    from dpr_hpc.cli.completion import bash_script

    print(bash_script(_parser()))
    return 0
def _submit_targets(plan: "Plan", layout: RunLayout, selection: Selection, args: argparse.Namespace, dry_run: bool = False):
    """What a submit with a selection or --force acts on (None: every job, none forced), and
    what it tells the user first: the forced reruns and the upstream jobs it adds."""
    from dpr_hpc.backends.submit_report import submit_targets
    from dpr_hpc.store.records import Records

    if selection.everything and not args.force_all:
        return None
    [selected] = selection.apply([plan])
    records = Records(layout.store, plan=plan)
    targets = submit_targets(plan, selected, records, force=args.force or args.force_all, dry_run=dry_run)
    for job in targets.forced:
        print(f"{job.id}: forced rerun (--force); its complete attempt {records.check(job).attempt} stays on disk", flush=True)
    for job in targets.upstream:
        print(f"{job.id}: not complete, and a selected job needs it: it runs first", flush=True)
    return targets


def _cancel(args: argparse.Namespace) -> int:
    from dpr_hpc.tracking import slurm_queue
    from dpr_hpc.tracking.ledger import Ledger
    from dpr_hpc.store.runs import grids_sharing

    runs = _runs(args.target, args.runs_root)
    selected = Selection.from_args(args).apply([plan for _, plan in runs])
    shared, unreadable = ({}, []) if args.include_shared else grids_sharing(runs)
    for problem in unreadable:
        print(f"warning: {problem}; the jobs that run shares with this grid are not known, so none of them is kept", file=sys.stderr)
    code = 0
    for (layout, plan), jobs in zip(runs, selected):
        ledger = Ledger.read(layout.store)
        standings = slurm_queue.ask_about(ledger, jobs).standings
        active = {job: s.job_id for job, s in standings.items() if s.info is not None and s.info.active}
        unknown = sorted({s.job_id for s in standings.values() if s.unknown})
        kept = {job: job_id for job, job_id in active.items() if job in shared}
        cancelled = sorted(set(active.values()) - set(kept.values()))
        slurm_queue.cancel(cancelled)
        print(f"grid {plan.grid_name}: cancelled {len(cancelled)} SLURM jobs")
        for job, job_id in kept.items():
            print(f"  kept {job.stage} {job.key[:8]} r{job.repeat} (SLURM job {job_id}): grid(s) "
                  f"{', '.join(sorted(set(shared[job])))} plan it too; --include-shared cancels it as well")
        if unknown:
            print(f"warning: SLURM job(s) {', '.join(unknown)} not cancelled: sacct has not listed them and squeue did not "
                  "answer, so whether they still run is unknown; run cancel again", file=sys.stderr)
            code = 1
    return code


def _status(args: argparse.Namespace) -> int:
    from dpr_hpc.tracking.status import selected_status, summary_line

    selection = Selection.from_args(args)
    if args.watch is not None:
        if args.json:
            raise UsageError("--watch redraws a table; it does not combine with --json")
        return _watch(args, selection)
    everything = []
    for layout, plan, report in selected_status(_runs(args.target, args.runs_root), selection):
        if args.json:
            everything.append({"grid": plan.grid_name, "run_dir": str(layout.root), "source": report.source,
                               "rows": [row.to_json() for row in report.rows], "summary": summary_line(report.states),
                               "left_cells": report.left_cells})
            continue
        print("\n".join(_status_lines(layout, plan, report)))
    if args.json:
        print(json.dumps(everything, indent=2))
    return 0


def _status_lines(layout: RunLayout, plan: "Plan", report) -> list[str]:
    from dpr_hpc.tracking.status import summary_line

    rows = [
        [row.cell_id, s.job.stage, str(s.job.repeat), "" if s.attempt is None else str(s.attempt),
         s.job.key[:8] + ("*" if row.shared_by > 1 else ""), s.state, s.job_id, s.node,
         s.detail + (f"  log: {s.log}" if s.state in ("FAILED", "TIMEOUT") and s.log else "")]
        for row in report.rows for s in [row.state]
    ]
    lines = [f"grid {plan.grid_name} ({layout.root}); states from the {report.source}",
             _columns(["CELL", "STAGE", "R", "A", "KEY", "STATE", "JOB", "NODE", "DETAIL"], rows),
             summary_line(report.states) + ("  (KEY*: a job shared by several cells)" if any(r.shared_by > 1 for r in report.rows) else "")]
    return lines + ([report.left_cells] if report.left_cells else [])


def _watch(args: argparse.Namespace, selection: Selection) -> int:
    """Redraw status in place (cursor up, clear to the end of the screen: plain ANSI) on a
    terminal; elsewhere print the summary line each time it changes. Ends by itself once no
    selected job is queued or running and no local submit works on the run."""
    from dpr_hpc.tracking.status import selected_status, still_active, summary_line

    if not (math.isfinite(args.watch) and args.watch > 0):
        raise UsageError(f"--watch {args.watch:g}: expected a positive number of seconds")
    redraw = sys.stdout.isatty()
    drawn, last_summary = 0, None
    while True:
        reports = list(selected_status(_runs(args.target, args.runs_root), selection))
        lines = [line for layout, plan, report in reports for line in _status_lines(layout, plan, report)]
        summary = "; ".join(summary_line(report.states) for _, _, report in reports)
        active = any(still_active(layout, report) for layout, _, report in reports)
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
            return 0
        time.sleep(args.watch)


def _logs(args: argparse.Namespace) -> int:
    from dpr_hpc.tracking.logs import LogPrinter, chosen_logs, follow

    layout, plan, cell_id = _one_cell(args.cell, _runs(args.grid, args.runs_root))
    job = _logged_job(layout, plan, cell_id, args.stage, args.repeat)
    folder = layout.store.job(job)
    printer = LogPrinter()
    if args.follow:
        try:
            follow(folder, args.attempt, lambda: _job_active(layout, job), printer)
        except KeyboardInterrupt:
            return 130  # Ctrl-C is how a user stops following: no message
        return 0
    logs = chosen_logs(folder, args.attempt)
    if not logs:
        print(f"{job.id} (cell {cell_id}) has no log yet; -f waits for it while the job is queued or running", file=sys.stderr)
        return 0
    printer.pump(logs)
    return 0


def _logged_job(layout: RunLayout, plan: "Plan", cell_id: str, stage: str | None, repeat: int):
    """The stage job `logs` shows: of `stage`, or of the cell's last stage with a log for this
    repeat (else its first stage, whose log comes first)."""
    from dpr_hpc.tracking.logs import job_logs

    cell = plan.cell(cell_id)
    if stage is not None and stage not in cell.stages:
        raise UsageError(f"--stage {stage}: cell {cell_id} has the stages {', '.join(cell.stages)}")
    stages = [stage] if stage else list(reversed(cell.stages))
    jobs = [plan.cell_jobs(cell_id, s)[repeat] for s in stages if repeat in range(cell.repeats.of(s))]
    if not jobs:
        raise UsageError(f"--repeat {repeat}: cell {cell_id}'s {' and '.join(stages)} has repeats 0 to {cell.repeats.of(stages[0]) - 1}")
    if stage:
        return jobs[0]
    return next((job for job in jobs if job_logs(layout.store.job(job))), jobs[-1])


def _one_cell(pattern: str, runs: list[tuple[RunLayout, "Plan"]]) -> tuple[RunLayout, "Plan", str]:
    """The one cell a glob names, over the runs; several cells (or one cell id in runs whose
    keys differ) is a usage error that lists them."""
    import fnmatch

    matches = [(layout, plan, c.cell_id) for layout, plan in runs for c in plan.cells if fnmatch.fnmatchcase(c.cell_id, pattern)]
    distinct = sorted({(cell_id, json.dumps(plan.keys[cell_id], sort_keys=True)) for _, plan, cell_id in matches})
    if not matches:
        raise UsageError(f"no cell matches '{pattern}'; cells here: {', '.join(c.cell_id for _, p in runs for c in p.cells[:5])} ...")
    if len(distinct) > 1:
        shown = sorted({cell_id for _, _, cell_id in matches})
        where = f"cells {', '.join(shown[:8])}" if len(shown) > 1 else f"cell {shown[0]} in runs {', '.join(str(l.root) for l, _, _ in matches)} (pass --grid)"
        raise UsageError(f"'{pattern}' matches {where}; name one")
    return matches[0]


def _job_active(layout: RunLayout, job) -> bool:
    """Queued or running: a live claim (local or SLURM), or a SLURM job the scheduler lists as active."""
    from dpr_hpc.tracking import slurm_queue
    from dpr_hpc.store.claims import live_claim
    from dpr_hpc.tracking.ledger import Ledger

    if live_claim(layout.store.job(job)):
        return True
    ledger = Ledger.read(layout.store)
    entry = ledger.latest(job)
    if not entry or entry.get("backend") != "slurm" or not slurm_queue.slurm_available():
        return False
    return slurm_queue.ask_about(ledger, [job]).standings[job].may_still_run


def _collect(args: argparse.Namespace) -> int:
    from dpr_hpc.reporting.collect import collect_table, parse_formats, terminal_table, terminal_width, write_table

    formats = parse_formats(args.format)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    outputs = []
    selection = Selection.from_args(args)
    for layout, plan in _selected_runs(args, selection):
        table = collect_table(layout, plan, median=args.median, selection=selection)
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
    from dpr_hpc.reporting.report import ReportOptions, write_report

    options = ReportOptions(baseline=args.baseline, variance_factor=args.variance_factor, html=not args.no_html, paper=args.paper)
    selection = Selection.from_args(args)
    for layout, plan in _selected_runs(args, selection):
        written = write_report(layout, plan, args.out / plan.grid_name, options, selection)
        print(f"grid {plan.grid_name}: report -> {', '.join(str(p) for p in written)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dpr_hpc.bench.stages import goals, run_benchmark
    from dpr_hpc.stages.runner import fit_threads_to_allocation, quiet_libraries

    quiet_libraries()
    fit_threads_to_allocation()
    if args.scale:
        return _bench_scale(args)
    if (args.train_fraction, args.dev_fraction, args.work) != (None, None, None):
        raise UsageError("--train-fraction, --dev-fraction and --work go with --scale")
    if args.control_path:
        from dpr_hpc.bench.control_path import run_control_benchmark

        report = run_control_benchmark(echo=lambda line: print(line, flush=True))
        _write_report(report, args.out, "bench-control")
        return 0
    report = run_benchmark(quick=args.quick, echo=lambda line: print(line, flush=True), compile=args.compile)
    report["goals"] = [{"goal": goal, "met": met, "measured": measured} for goal, met, measured in goals(report)]
    _print_goals(report["goals"])
    _write_report(report, args.out, "bench")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dpr_hpc.bench.scale import FULL_CPU, QUICK, hnsw_summary, run_scale_benchmark, table

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
    from dpr_hpc.bench.gpu_check import run_gpu_check
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
    from dpr_hpc.store.runs import runs_for

    return runs_for(target, runs_root)


def _selected_runs(args: argparse.Namespace, selection: Selection) -> list[tuple[RunLayout, "Plan"]]:
    """The runs a command acts on that hold a selected job (every run without a selection)."""
    runs = _runs(args.target, args.runs_root)
    selected = selection.apply([plan for _, plan in runs])
    return [run for run, jobs in zip(runs, selected) if jobs]


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def _version() -> str:
    from dpr_hpc import __version__

    return __version__
