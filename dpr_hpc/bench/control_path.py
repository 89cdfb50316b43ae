"""Benchmark of the control path at the real commands: the wall time of `dpr-hpc plan`,
`submit --dry-run`, `submit` with every job already queued and `status`, each run as its own
process (interpreter start and imports included, as a user meets them), on generated grid files
of 100 and 2,000 cells (issue 22's goal: each <= 2 s at 2,000 cells, growing linearly).

Each grid is one local tiny BERT (the offline demo's) trained with N seeds: N cells, 3 stage jobs
each. There is no cluster here, so the bench puts its own fake SLURM first on PATH: `squeue` and
`sacct` list every queued job as PENDING, from a queue file; `sacctmgr` and `scontrol` fail (no
submit limit); `sbatch` refuses. The queue is filled once per size, untimed, by a real
`submit --backend slurm` in which only the sbatch call is replaced (it appends the job to the
queue file instead). The timed `submit` then finds every job queued, asks the scheduler once and
queues nothing; `status` shows every job PENDING. Every command's exit code and output are
checked, so a figure is never the time of a command that failed early.

`--code DIR` times another checkout's commands (their PYTHONPATH is DIR), so one harness measures
before and after a change:
    python -m dpr_hpc.bench.control_path --code /tmp/before --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dpr_hpc.provenance import node_tags, now_iso

SIZES = (100, 2000)
COMMANDS = ("plan_s", "submit_dry_run_s", "submit_queued_s", "status_s")
GOAL_S = 2.0
FIRST_JOB_ID = 100_001

# The fake SLURM (POSIX sh + awk): the queue file holds one job a line, "id|comment".
_FAKES = {
    "squeue": r'''
fmt=""
while [ $# -gt 0 ]; do case "$1" in -o|--format) fmt="$2"; shift;; esac; shift; done
[ -f "$DPR_BENCH_QUEUE" ] || exit 0
case "$fmt" in
  *%k*) awk -F'|' '{print $1 "|" $2}' "$DPR_BENCH_QUEUE" ;;
  *%T*) awk -F'|' '{print $1 "|PENDING||0:00|Priority"}' "$DPR_BENCH_QUEUE" ;;
  *) cut -d'|' -f1 "$DPR_BENCH_QUEUE" ;;
esac
''',
    # Every queued job, whatever -j asks: the code keeps the ones it asked about.
    "sacct": r'''
[ -f "$DPR_BENCH_QUEUE" ] || exit 0
awk -F'|' '{print $1 "|PENDING|0:0|None assigned|00:00:00|Priority"}' "$DPR_BENCH_QUEUE"
''',
    "sbatch": 'echo "sbatch: error: the control-path benchmark queues jobs only in its untimed set-up" >&2; exit 1',
    "sacctmgr": 'echo "sacctmgr: error: no accounting in the control-path benchmark" >&2; exit 1',
    "scontrol": 'echo "scontrol: error: no controller in the control-path benchmark" >&2; exit 1',
}

# The set-up: a real `dpr-hpc submit`, its sbatch replaced by an append to the queue file.
_QUEUE_EVERYTHING = r'''
import runpy, sys
from dpr_hpc.backends.slurm import SlurmBackend

queue = open(sys.argv[1], "a")
count = [0]

def sbatch(self, job, dependencies, nonce):
    count[0] += 1
    job_id = str(%d + count[0])
    queue.write(f"{job_id}|dpr-hpc:{nonce}\n")
    return job_id

SlurmBackend._sbatch = sbatch
sys.argv = ["dpr-hpc", *sys.argv[2:]]
try:
    runpy.run_module("dpr_hpc", run_name="__main__")
finally:
    queue.close()
''' % (FIRST_JOB_ID - 1)


def run_control_benchmark(sizes: tuple[int, ...] = SIZES, echo: Callable[[str], None] = print, code: Path | None = None,
                          demo: Path | None = None) -> dict[str, Any]:
    """Time the four commands at each size; `code` is the checkout whose commands run (this
    one by default), `demo` an offline demo folder to take the tiny BERT and data from."""
    code = (code or Path(__file__).resolve().parents[2]).resolve()  # the checkout holding dpr_hpc/
    report: dict[str, Any] = {"started_at": now_iso(), "node": node_tags(), "code": str(code), "rows": [],
                              "scheduler": "fake squeue/sacct on PATH listing every job PENDING (no cluster)"}
    with tempfile.TemporaryDirectory(prefix="dpr-bench-control-") as folder:
        work = Path(folder)
        if demo is None:
            from dpr_hpc.demo.generate import generate_demo

            demo = work / "demo"
            generate_demo(demo, pretrained=False)
        env = _environment(work, code)
        report["imports_from"] = _imported_package(env, work)
        _expect(Path(report["imports_from"]).resolve().is_relative_to(code), "the code under test",
                f"the commands import dpr_hpc from {report['imports_from']}, not from {code}")
        for cells in sizes:
            row = _measure(work / f"cells-{cells}", cells, demo, env)
            report["rows"].append(row)
            echo(f"{cells:>5} cells, {row['jobs']:>5} jobs: plan {row['plan_s']:.2f}s (first {row['first_plan_s']:.2f}s), "
                 f"submit --dry-run {row['submit_dry_run_s']:.2f}s, submit (all queued) {row['submit_queued_s']:.2f}s, "
                 f"status {row['status_s']:.2f}s")
    first, last = report["rows"][0], report["rows"][-1]
    report["cells_ratio"] = last["cells"] / first["cells"]
    report["growth"] = {phase: round(last[phase] / first[phase], 2) for phase in COMMANDS}
    # The cost of one more cell: what grows with the grid, apart from each command's fixed start.
    report["ms_per_cell"] = {phase: round(1000 * (last[phase] - first[phase]) / max(1, last["cells"] - first["cells"]), 3) for phase in COMMANDS}
    report["goal"] = {"max_s": GOAL_S, "cells": last["cells"], "met": all(last[phase] <= GOAL_S for phase in COMMANDS)}
    echo(f"growth {first['cells']} -> {last['cells']} cells (x{report['cells_ratio']:g}): "
         + ", ".join(f"{phase.removesuffix('_s')} x{ratio}" for phase, ratio in report["growth"].items()))
    return report


def _imported_package(env: dict[str, str], cwd: Path) -> str:
    """Where the timed commands import dpr_hpc from, as they will run."""
    done = subprocess.run([sys.executable, "-c", "import dpr_hpc; print(dpr_hpc.__file__)"], env=env, capture_output=True, text=True, cwd=cwd)
    return done.stdout.strip()


def _environment(work: Path, code: Path) -> dict[str, str]:
    bin_dir = work / "fake-slurm"
    bin_dir.mkdir(parents=True)
    for name, body in _FAKES.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body.lstrip())
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(code),
           "HF_HUB_OFFLINE": "1", "DPR_HPC_CACHE": str(work / "cache")}
    env.pop("DPR_HPC_RUNS_ROOT", None)
    return env


def _grid(folder: Path, cells: int, demo: Path) -> Path:
    """N cells of one tiny BERT that differ only in their training seed."""
    lines = [f"name: control-{cells}", f"data: {{train: {demo / 'train.json'}, dev: {demo / 'dev.json'}}}", "blocks:",
             "  - name: bert", f"    encoder: {demo / 'models' / 'tiny-bert'}", "    cells:"]
    lines += [f"      - {{embedding_size: 32, train: {{seed: {seed}}}}}" for seed in range(cells)]
    folder.mkdir(parents=True)
    grid = folder / "grid.yaml"
    grid.write_text("\n".join(lines) + "\n")
    return grid


def _measure(folder: Path, cells: int, demo: Path, env: dict[str, str]) -> dict[str, Any]:
    grid = _grid(folder, cells, demo)
    runs = ["--runs-root", str(folder / "runs")]
    jobs = 3 * cells
    env = {**env, "DPR_HPC_RUNS_ROOT": str(folder / "runs"), "DPR_BENCH_QUEUE": str(folder / "queue")}

    first_plan_s, _ = _timed(env, folder, "plan", grid, *runs)  # fills what a later plan may remember
    plan_s, out = _timed(env, folder, "plan", grid, *runs)
    _expect(f"{cells} cells, {jobs} stage jobs" in out, "plan", out)
    dry_s, out = _timed(env, folder, "submit", grid, "--dry-run", *runs)
    _expect(out.count("# ---- ") == jobs, "submit --dry-run", out)

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _QUEUE_EVERYTHING, str(folder / "queue"), "submit", str(grid), "--backend", "slurm", *runs],
                          env=env, capture_output=True, text=True, cwd=folder)
    setup_s = time.perf_counter() - started
    _expect(done.returncode == 0 and f"{jobs} submitted" in done.stdout, "the set-up submit", done.stdout + done.stderr)
    queued = (folder / "queue").read_text().splitlines()
    _expect(len(queued) == jobs, "the set-up submit", f"{len(queued)} jobs queued, expected {jobs}")

    submit_s, out = _timed(env, folder, "submit", grid, "--backend", "slurm", *runs)
    _expect(f"0 submitted, 0 already complete (skipped), {jobs} already queued or running (left alone)" in out, "submit (all queued)", out)
    status_s, out = _timed(env, folder, "status", grid, *runs)
    _expect(f"{jobs} stage jobs: {jobs} PENDING" in out, "status", out)
    return {"cells": cells, "jobs": jobs, "first_plan_s": round(first_plan_s, 3), "plan_s": round(plan_s, 3),
            "submit_dry_run_s": round(dry_s, 3), "submit_queued_s": round(submit_s, 3), "status_s": round(status_s, 3),
            "setup_s": round(setup_s, 3)}


def _timed(env: dict[str, str], cwd: Path, *args: Any) -> tuple[float, str]:
    """One `dpr-hpc` command in its own process: its wall time and its output (exit 0 required).
    It runs in the grid's folder: `python -m` puts its working directory first on sys.path, so
    run from a checkout it would import that checkout's code, not `--code`'s."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dpr_hpc", *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - started
    _expect(done.returncode == 0, f"dpr-hpc {args[0]}", f"exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout


def _expect(ok: bool, what: str, output: str) -> None:
    if not ok:
        raise RuntimeError(f"control-path benchmark: {what} did not do what it is timed for:\n{output[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpr_hpc.bench.control_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, help="the checkout whose commands are timed (default: this one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="grid sizes in cells (default: 100 2000)")
    parser.add_argument("--demo", type=Path, help="an offline demo folder (dpr-hpc generate-demo) to take the tiny BERT and data "
                        "from (default: one generated for this run)")
    parser.add_argument("--out", type=Path, help="write the JSON report into this folder")
    args = parser.parse_args(argv)
    report = run_control_benchmark(tuple(args.sizes), echo=lambda line: print(line, flush=True), code=args.code, demo=args.demo)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench-control-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
