"""dpr-hpc's command line: parse the flags (cli.parser), call the service layer (dpr_hpc.api),
render what it returns (cli.render), exit. Exit codes: 0 success, 1 a stage job failed (or the
scheduler did not answer), 2 bad input, 3 a submit that left jobs deferred by the cluster's
submit limit."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from dpr_hpc import api
from dpr_hpc.cli import render
from dpr_hpc.cli.parser import build_parser
from dpr_hpc.errors import DprHpcError, UsageError

# A submit that queued what it could but had to defer jobs over the cluster's submit limit:
# not a failure, not done either (scripts that loop on submit wait on this code).
EXIT_DEFERRED = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
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
        print(f"dpr-hpc: error: {render.describe_os_error(error)}", file=sys.stderr)
        return 1


def _selection(args: argparse.Namespace) -> dict[str, list[str]]:
    """--cell, --group and --stage as the service layer's keyword arguments."""
    return {"cells": args.cell, "groups": args.group, "stages": args.stage}


def _plan(args: argparse.Namespace) -> int:
    planned = api.plan(args.grid, runs_root=args.runs_root)
    if args.json:
        print(json.dumps(planned.to_json(), indent=2))
        return 0
    print(render.plan_text(planned, args.grid))
    render.grid_notes(planned.notes)
    return 0


def _submit(args: argparse.Namespace) -> int:
    report = api.submit(
        args.grid, backend=args.backend, **_selection(args), force=args.force, force_all=args.force_all, dry_run=args.dry_run,
        runs_root=args.runs_root, profile=args.profile, hold=args.hold, retry_failed=args.retry_failed,
        time_limit_min=args.time_limit, signal_delay_s=args.signal_delay, exclude_node=args.exclude_node, nodelist=args.nodelist,
        progress=render.echo,
    )
    if args.dry_run:
        render.dry_run(report)
        return 0
    render.turned_stale(report)
    if not report.ok:
        return 1
    return EXIT_DEFERRED if report.deferred else 0


def _prefetch(args: argparse.Namespace) -> int:
    fetched = api.prefetch(args.grid, update=args.update, runs_root=args.runs_root, progress=render.echo)
    print(f"grid {fetched.grid}: {len(fetched.revisions)} hub model(s) pinned in {fetched.pins_file} and recorded in {fetched.models_file}")
    for model, revision in fetched.revisions.items():
        print(f"  {model}  {revision}")
    if fetched.data:
        print(f"grid {fetched.grid}: {len(fetched.data)} named data source(s) verified and pinned in {fetched.data_pins_file}")
    for name, path in fetched.data.items():
        print(f"  {name}  {path}")
    return 0


def _completion(args: argparse.Namespace) -> int:
    from dpr_hpc.cli.completion import bash_script

    print(bash_script(build_parser()))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    report = api.cancel(args.target, runs_root=args.runs_root, **_selection(args), include_shared=args.include_shared)
    render.cancelled(report)
    return 0 if report.ok else 1


def _status(args: argparse.Namespace) -> int:
    def read() -> list[api.RunStatus]:
        return api.status_reports(args.target, runs_root=args.runs_root, **_selection(args))

    if args.watch is not None:
        if args.json:
            raise UsageError("--watch redraws a table; it does not combine with --json")
        if not (math.isfinite(args.watch) and args.watch > 0):
            raise UsageError(f"--watch {args.watch:g}: expected a positive number of seconds")
        render.watch(read, args.watch)
        return 0
    runs = read()
    if args.json:
        print(render.status_json(runs))
        return 0
    for run in runs:
        print("\n".join(render.status_lines(run, args.verbose)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from dpr_hpc.tracking.logs import LogPrinter, follow

    found = api.logs(args.cell, grid=args.grid, stage=args.stage, repeat=args.repeat, attempt=args.attempt, runs_root=args.runs_root,
                     shard=args.shard)
    printer = LogPrinter()
    if args.follow:
        try:
            follow(found.folder, args.attempt, found.active, printer)
        except KeyboardInterrupt:
            return 130  # Ctrl-C is how a user stops following: no message
        return 0
    if not found.logs:
        print(f"{found.job.id} (cell {found.cell_id}) has no log yet; -f waits for it while the job is queued or running", file=sys.stderr)
        return 0
    printer.pump(found.logs)
    return 0


def _collect(args: argparse.Namespace) -> int:
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    tables = api.collect(args.target, runs_root=args.runs_root, median=args.median, out=args.out, formats=args.format, **_selection(args))
    if args.json:
        print(json.dumps([{"grid": t.grid, "files": [str(p) for p in t.files], "rows": json.loads(t.table.to_json(orient="records"))}
                          for t in tables], indent=2))
        return 0
    for t in tables:
        render.collected(t.grid, t.table, t.files, columns)
    return 0


def _report(args: argparse.Namespace) -> int:
    written = api.report(args.target, runs_root=args.runs_root, out=args.out, baseline=args.baseline, variance_factor=args.variance_factor,
                         html=not args.no_html, paper=args.paper, **_selection(args))
    for grid, files in written.items():
        print(f"grid {grid}: report -> {', '.join(str(p) for p in files)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dpr_hpc.bench.stages import goals, run_benchmark
    from dpr_hpc.stages.runner import fit_threads_to_allocation

    _quiet_libraries()
    fit_threads_to_allocation()
    if args.compile and (args.control_path or args.scale):
        raise UsageError("--compile goes with the stage benchmark, not with --control-path or --scale")
    if args.scale:
        return _bench_scale(args)
    if (args.train_fraction, args.dev_fraction, args.work) != (None, None, None):
        raise UsageError("--train-fraction, --dev-fraction and --work go with --scale")
    if (args.corpus_passages, args.gpu_check) != (None, None) or args.corpus_only:
        raise UsageError("--corpus-passages, --corpus-only and --gpu-check go with --scale")
    if args.control_path:
        from dpr_hpc.bench.control_path import run_control_benchmark

        report = run_control_benchmark(echo=render.echo)
        _write_report(report, args.out, "bench-control")
        return 0
    report = run_benchmark(quick=args.quick, echo=render.echo, compile=args.compile)
    report["goals"] = [{"goal": goal, "met": met, "measured": measured} for goal, met, measured in goals(report)]
    render.goals(report["goals"])
    _write_report(report, args.out, "bench")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dpr_hpc.bench.scale import FULL_CPU, QUICK, hnsw_summary, run_scale_benchmark, table
    from dpr_hpc.bench.scale_corpus import corpus_summary

    size = QUICK if args.quick else FULL_CPU
    for flag, value in (("--train-fraction", args.train_fraction), ("--dev-fraction", args.dev_fraction)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag} {value}: expected a fraction in (0, 1]")
    if args.corpus_passages is not None and (args.corpus_passages < 0 or (args.corpus_only and args.corpus_passages == 0)):
        raise UsageError(f"--corpus-passages {args.corpus_passages}: expected a number of passages (0 skips the corpus phase, so not with --corpus-only)")
    size = replace(size, train_fraction=args.train_fraction or size.train_fraction, dev_fraction=args.dev_fraction or size.dev_fraction,
                   corpus_passages=size.corpus_passages if args.corpus_passages is None else args.corpus_passages)
    report = run_scale_benchmark(size, args.work, echo=render.echo, gpu_check_report=args.gpu_check, nq=not args.corpus_only)
    print()
    if not args.corpus_only:
        print(table(report))
        print(hnsw_summary(report))
    if report.get("corpus"):
        print(corpus_summary(report))
    render.goals(report["goals"])
    _write_report(report, args.out, "bench-scale")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from dpr_hpc.bench.gpu_check import run_gpu_check

    _quiet_libraries()
    report = run_gpu_check(smoke=args.smoke, budget_s=args.budget_s, echo=render.echo)
    _write_report(report, args.out, "gpu-check-smoke" if args.smoke else "gpu-check")
    return 0


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

    _quiet_libraries()
    out = args.out or Path("data/demo")
    summary = generate_demo(out)
    print(f"demo data in {out}: {summary['train']} training questions, {summary['dev']} dev questions, "
          f"{summary['passages']} passages; models: {', '.join(summary['models'])}; corpus (jobs/demo-corpus.yaml): "
          f"{summary['corpus_passages']} passages, {summary['corpus_questions']} questions")
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


def _quiet_libraries() -> None:
    """Progress bars and warnings of torch and transformers off, for the commands that load them."""
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": _plan, "submit": _submit, "prefetch": _prefetch, "completion": _completion, "cancel": _cancel, "status": _status,
    "logs": _logs, "collect": _collect, "report": _report, "generate-demo": _generate_demo, "bench": _bench, "gpu-check": _gpu_check,
}
