"""dpr-hpc's argument parser: every command, its flags and their help. It only describes the
command line; cli.main turns the parsed flags into service-layer calls (dpr_hpc.api)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dpr_hpc.planning.selection import STAGES, add_selection_flags

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


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag; each command's name is `args.command`, which cli.main dispatches on."""
    parser = argparse.ArgumentParser(prog="dpr-hpc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runs_root = argparse.ArgumentParser(add_help=False)
    runs_root.add_argument(
        "--runs-root", type=Path, default=None,  # None: dpr_hpc.store.layout.runs_root_or_default decides
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

    prefetch = commands.add_parser(
        "prefetch", parents=[runs_root], help="download every hub model and named data file a grid uses, for offline nodes",
        description="Download every hub model and tokenizer the grid's encoders name (local folders are left alone) into "
        "the Hugging Face cache ($HF_HOME/hub, or $HF_HUB_CACHE) and pin each to a commit for every grid under --runs-root "
        "(store/hub-pins.json): the hub's main at the model's first use, or the commit pinned before. Each model's commit "
        "is recorded in the run folder's models.json. Run it on the login node: stage jobs run with HF_HUB_OFFLINE=1 and "
        "load exactly that commit from the same cache. A stage key names a hub model by its commit, so a pin moves only "
        "with --update. Data the grid names instead of giving a path (dpr:nq-train, dpr:nq-dev, dpr:psgs_w100, "
        "dpr:nq-test) is downloaded into $DPR_HPC_DATA_DIR (default ~/.cache/dpr-hpc/data), resuming a broken download, "
        "checked against the published md5 or the sha256 pinned at its first download, and never asked for again once "
        "there; $DPR_HPC_DATA_MIRROR replaces DPR's server.",
    )
    prefetch.add_argument("grid", type=Path, help="grid file (YAML)")
    prefetch.add_argument("--update", action="store_true",
                          help="fetch the hub's main now and move each pin to it; the stage jobs of a model whose commit "
                               "changed get new keys and run again at their next submit (earlier results stay in the store)")

    completion = commands.add_parser("completion", help="print a shell completion script for dpr-hpc's commands and flags",
                                     description="Enable with:  eval \"$(dpr-hpc completion bash)\"  (bash; zsh after 'autoload -U bashcompinit && bashcompinit')")
    completion.add_argument("shell", choices=("bash",), help="the shell the script is for")

    cancel = commands.add_parser("cancel", parents=[runs_root], help="cancel the queued and running SLURM jobs of a grid")
    cancel.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    add_selection_flags(cancel, "An exact cell id matches itself.")
    cancel.add_argument("--include-shared", action="store_true",
                        help="also cancel jobs that another grid under --runs-root plans too (by default they are kept "
                             "and named: one stage job serves every grid that plans it)")

    status = commands.add_parser("status", parents=[runs_root], help="show every cell x stage x repeat with its state")
    status.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--verbose", "-v", action="store_true", help="a row for each task of a job array too (by default one line per array)")
    add_selection_flags(status, "The summary line counts the selected jobs only.")
    status.add_argument(
        "--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until nothing is queued or running, then print the summary line",
    )

    logs = commands.add_parser(
        "logs", parents=[runs_root], help="print a stage job's stdout and stderr; -f follows them while it runs",
        description="Print the log files of one stage job of one cell: the newest attempt's by default. CELL is a cell id "
        "or a glob that matches exactly one cell.",
    )
    logs.add_argument("cell", metavar="CELL", help="cell id, or a glob matching one cell")
    logs.add_argument("--grid", metavar="TARGET", help="grid file or run folder (default: every run under --runs-root)")
    logs.add_argument("--stage", choices=STAGES, help="default: the last stage of the cell that has a log")
    logs.add_argument("--repeat", type=int, default=0, help="the repeat (default 0)")
    logs.add_argument("--shard", type=int, help="with --stage encode-shard or search-shard: the shard, an array task on SLURM (default 0)")
    logs.add_argument("--attempt", type=int, help="the store attempt (default: the newest); status shows it in column A")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the job writes until it is no longer queued or running")

    collect = commands.add_parser("collect", parents=[runs_root], help="merge result records into one table (CSV and Markdown)")
    collect.add_argument("target", nargs="?", help="grid file or run folder (default: every run under --runs-root)")
    collect.add_argument("--median", action="store_true", help="one row per cell: median over repeats, with count and spread")
    collect.add_argument("--out", type=Path, default=Path("results"), help="where the CSV and Markdown files go (default: results/)")
    collect.add_argument("--json", action="store_true", help="print the table as JSON records instead of Markdown")
    collect.add_argument("--format", default="csv,md", help="files to write, several at once: csv,md,json (default: csv,md)")
    collect.add_argument("--columns", help="comma-separated columns to print (default: those of the paper's tables that fit the terminal)")
    add_selection_flags(collect, "--stage keeps the figures of those stages only.")

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

    demo = commands.add_parser("generate-demo", help="write the offline demo's data, tokenizer and tiny models")
    demo.add_argument("out", type=Path, nargs="?", help="output folder (default: data/demo, or data/nq-shaped with --scale nq)")
    demo.add_argument("--scale", choices=["demo", "nq"], default="demo",
                      help="demo: the small demo with models; nq: DPR-format train and dev files shaped like NQ's (data only)")
    demo.add_argument("--fraction", type=float, help="with --scale nq: this fraction of NQ's question counts and pool, in (0, 1]")

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
        help="instead: wall time of the commands plan, submit --dry-run, submit with every job already queued, and status, "
        "each in its own process, on generated grids of 100 and 2,000 cells (a fake squeue/sacct on PATH lists every job pending)",
    )
    bench.add_argument(
        "--scale", action="store_true",
        help="instead: every stage phase (parse, prepare, map, tokenise, encode, HNSW M=512 build, search) on NQ-shaped data, "
        "each in its own process: wall time, peak RSS and disk, extrapolated to full NQ where a fraction ran "
        "(about 30 min and 7 GB of scratch on 2 CPU cores), then the corpus phase: a synthetic 1 M-passage Wikipedia shard encoded, "
        "searched and merged, extrapolated to 21 M passages in 50 shards (about 10 min and 5 GB more)",
    )
    bench.add_argument("--train-fraction", type=float, help="--scale: the share of NQ's 58,880 train questions generated (default 1.0)")
    bench.add_argument("--dev-fraction", type=float, help="--scale: the share of NQ's 935,159-passage dev pool generated (default 1.0)")
    bench.add_argument("--work", type=Path, help="--scale: keep the generated data, caches and indexes in this folder (default: a temporary one)")
    bench.add_argument("--corpus-passages", type=int,
                       help="--scale: passages in the synthetic Wikipedia shard of the corpus phase (default 1,000,000; 0 skips the phase)")
    bench.add_argument("--corpus-only", action="store_true", help="--scale: only the corpus phase (encode-shard, search-shard, merge)")
    bench.add_argument("--gpu-check", type=Path, metavar="REPORT",
                       help="--scale: a `dpr-hpc gpu-check` report whose encode rate prices encoding Wikipedia in GPU-hours")

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
    return parser


def _version() -> str:
    from dpr_hpc import __version__

    return __version__
