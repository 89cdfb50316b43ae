"""Fake SLURM commands for the tests that need no cluster: executables put first on PATH.

`squeue` answers as SLURM's does: it reads the jobs from `$FAKE_SLURM/queue` (one a line:
id|state|nodes|elapsed|reason|comment[|user]) and prints them in the `-o`/`--format` it is
given (man squeue: %i job id, %T state in long form, %N nodes, %M time used, %r reason,
%k comment, %u user; `%.N` right-justifies to N characters, `%N` left-justifies, both
truncate), with a header unless `-h`, only the states `-t` names (by default, squeue's: the
jobs still in the queue), and only the users `-u` names. A format it does not know is an
error, as in squeue, so a test fails where the code asks for a field the fake cannot give.
`$FAKE_SLURM/squeue.fail` (JSON: {"when": a substring of the arguments, "message": ...})
makes the calls that match fail, as a squeue that times out or cannot reach slurmctld.
Every call's arguments are appended to `$FAKE_SLURM/<command>.args`.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SQUEUE = r'''
import getpass, json, os, re, sys

folder = os.environ["FAKE_SLURM"]
args = sys.argv[1:]
with open(os.path.join(folder, "squeue.args"), "a") as log:
    log.write(" ".join(args) + "\n")
fail = os.path.join(folder, "squeue.fail")
if os.path.exists(fail):
    rule = json.load(open(fail))
    if rule.get("when", "") in " ".join(args):
        print(rule.get("message", "squeue: error: Socket timed out on send/recv operation"), file=sys.stderr)
        sys.exit(1)
header, fmt, states, users = True, None, None, None
i = 0
while i < len(args):
    arg = args[i]
    if arg in ("-h", "--noheader"):
        header = False
    elif arg in ("-o", "--format", "-t", "--states", "-u", "--user"):
        i += 1
        value = args[i]
        if arg in ("-o", "--format"):
            fmt = value
        elif arg in ("-t", "--states"):
            states = value
        else:
            users = value.split(",")
    elif arg.startswith("--format="):
        fmt = arg.split("=", 1)[1]
    else:
        print(f"squeue: fake: unsupported option {arg}", file=sys.stderr)
        sys.exit(2)
    i += 1
if fmt is None:
    print("squeue: fake: no -o given; the default format is not faked", file=sys.stderr)
    sys.exit(2)
FIELDS = {"i": ("JOBID", 0), "T": ("STATE", 1), "N": ("NODELIST", 2), "M": ("TIME", 3), "r": ("REASON", 4),
          "k": ("COMMENT", 5), "u": ("USER", 6)}
parts = re.split(r"(%\.?\d*[A-Za-z])", fmt)
for part in parts:
    if part.startswith("%") and part[-1] not in FIELDS:
        print(f"squeue: error: Invalid job format specification: {part[-1]}", file=sys.stderr)
        sys.exit(1)
STILL_QUEUED = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
wanted = None if states == "all" else (STILL_QUEUED if states is None else {s.upper() for s in states.split(",")})

def render(values):
    out = []
    for part in parts:
        if not part.startswith("%"):
            out.append(part)
            continue
        spec = part[1:-1]
        value = values[FIELDS[part[-1]][1]]
        if spec:
            width = int(spec.lstrip("."))
            value = value[:width].rjust(width) if spec.startswith(".") else value[:width].ljust(width)
        out.append(value)
    return "".join(out)

path = os.path.join(folder, "queue")
lines = open(path).read().splitlines() if os.path.exists(path) else []
if header:
    print(render([name for name, _ in sorted(FIELDS.values(), key=lambda f: f[1])]))
for line in lines:
    values = (line.split("|") + [""] * 7)[:7]
    values[6] = values[6] or getpass.getuser()
    if wanted is not None and values[1] not in wanted:
        continue
    if users is not None and values[6] not in users:
        continue
    print(render(values))
'''

SACCT = 'echo "$@" >> "$FAKE_SLURM/sacct.args"\nif [ -f "$FAKE_SLURM/sacct.fail" ]; then cat "$FAKE_SLURM/sacct.fail" >&2; exit 1; fi\ncat "$FAKE_SLURM/sacct.out" 2>/dev/null; exit 0'


def write_command(bin_dir: Path, name: str, body: str) -> Path:
    """A bash command that logs its arguments, then runs `body`."""
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\necho "$@" >> "$FAKE_SLURM/{name}.args"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def install(bin_dir: Path, monkeypatch, commands: dict[str, str]) -> Path:
    """`squeue` as above, `sacct` printing `$FAKE_SLURM/sacct.out` (failing with the text of
    `sacct.fail` where that exists), `srun` exiting 0 (submitit looks for it before anything
    else), and `commands` (name -> bash body, replacing any of those), first on PATH: what
    dpr-hpc does with SLURM's answers, tested on a machine where SLURM was never installed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!{sys.executable}\n{SQUEUE}")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    write_command(bin_dir, "sacct", SACCT)
    for name, body in {"srun": "exit 0", **commands}.items():
        write_command(bin_dir, name, body)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    return bin_dir


def queue_line(job_id: str, state: str, nodes: str = "", elapsed: str = "0:00", reason: str = "None", comment: str = "") -> str:
    """One job of the fake queue, as squeue would show its fields."""
    return "|".join((job_id, state, nodes, elapsed, reason, comment)) + "\n"
