"""The test SLURM cluster (tests/slurm/cluster-up.sh) as the integration tests drive it: bringing
it up, the helpers that wait on job states, and leaving it clean after every test. conftest.py
owns the fixtures; this module owns what they and the SLURM tests do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "slurm"
PROFILE = REPO / "slurm_templates" / "test-cluster.yaml"
# What a job can end in. Everything else (PENDING, RUNNING, REQUEUED, HELD and UNKNOWN, which a
# controller that does not answer gives) may still change, so a wait goes on through it.
SETTLED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "INTERRUPTED", "BLOCKED", "UNREADABLE", "STALE"}
T = TypeVar("T")


def wanted_nodes() -> int:
    """How many nodes the session's cluster has: $DPR_HPC_TEST_NODES (CI: 3), else 1, the fastest."""
    return int(os.environ.get("DPR_HPC_TEST_NODES", "1"))


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster: its SLURM_CONF (already in this process's environment) and nodes."""

    conf: str
    nodes: tuple[str, ...]
    started_here: bool  # False: cluster-up.sh reused one it had started before this session

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=120)

    def queued(self) -> list[str]:
        """Every job the cluster still lists (all of them are the tests': the cluster is ours)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def clean_up(self) -> None:
        """Cancels every job (held ones and long trainings included) and waits until the queue
        is empty, then returns every node to service: the next test finds the cluster as new."""
        self.ensure_controller()
        self.run("scancel", "-u", str(os.getuid()), check=False)
        wait_for(lambda: not self.queued(), 180, "the cancelled jobs to leave the queue")
        self.resume_nodes()

    def resume_nodes(self) -> None:
        for node in self.nodes:
            state = self.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()
            if any(word in state for word in ("drain", "down")):
                self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
        wait_for(lambda: all(s in ("idle", "mixed", "allocated") for s in self.node_states().values()), 120, "every node back in service")

    def node_states(self) -> dict[str, str]:
        lines = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return dict(line.split() for line in lines if line.strip())

    def ensure_controller(self) -> None:
        """A test that stopped the controller and failed before starting it again: start it."""
        if "is UP" not in self.run("scontrol", "ping", check=False).stdout:
            self.start_controller()

    def stop_controller(self) -> None:
        """slurmctld and slurmdbd stop, as when the head node restarts; nodes and jobs run on."""
        self.run(str(SCRIPTS / "cluster-controller.sh"), "stop")

    def start_controller(self) -> None:
        self.run(str(SCRIPTS / "cluster-controller.sh"), "start")


def bring_up(nodes: int) -> SlurmCluster:
    """cluster-up.sh --nodes `nodes`; skips (fails with DPR_HPC_REQUIRE_SLURM=1, as CI sets) with
    its reason where no cluster can be had here."""
    try:
        done = subprocess.run(["bash", str(SCRIPTS / "cluster-up.sh"), "--nodes", str(nodes)], capture_output=True, text=True, timeout=1200)
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        up = done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        up, reason, done = False, str(exc), None
    if not up:
        if os.environ.get("DPR_HPC_REQUIRE_SLURM") == "1":
            pytest.fail(f"DPR_HPC_REQUIRE_SLURM=1 but no SLURM cluster could be started: {reason}")
        pytest.skip(f"no SLURM cluster here: {reason}")
    conf = done.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    return SlurmCluster(conf, tuple(f"node{k}" for k in range(1, nodes + 1)), "reusing" not in done.stderr)


def bring_down() -> None:
    subprocess.run(["bash", str(SCRIPTS / "cluster-down.sh")], capture_output=True, text=True, timeout=300)


def wait_for(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 1.0) -> T:
    """Polls `check` until it returns something true (which it returns); fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(every_s)


def cli(*args, cwd: Path, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dpr_hpc", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def status(work: Path, grid: Path) -> list[dict]:
    return json.loads(cli("status", grid, "--json", cwd=work, check=True).stdout)[0]["rows"]


def wait_until_settled(work: Path, grid: Path, timeout_s: float = 900) -> list[dict]:
    """Every job of the grid in a state it ends in (SETTLED); UNKNOWN is not one."""
    last: list[dict] = []

    def settled() -> list[dict] | None:
        last[:] = status(work, grid)
        return list(last) if all(j["state"] in SETTLED for j in last) else None

    try:
        return wait_for(settled, timeout_s, "the grid's jobs to settle", every_s=3)
    except pytest.fail.Exception:
        pytest.fail(f"jobs still unsettled after {timeout_s:.0f} s: {[(j['stage'], j['repeat'], j['state'], j['detail']) for j in last]}")


def records(work: Path) -> list[dict]:
    """Every result record under the run folder's store."""
    return [json.loads(p.read_text()) for p in sorted(work.glob("runs/store/*/*/*/result.json"))]


def grid_with_training(folder: Path, demo: Path, name: str, untrained_indexes: int = 0, every_steps: int = 4) -> Path:
    """One trained tiny BERT cell (train, one index, one infer; 72 steps, a checkpoint every
    `every_steps`) and, with `untrained_indexes`, the same weights evaluated as given: that many
    index repeats (which need no training, so they run at once) and one infer."""
    from conftest import write_grid

    evaluated = (f"- {{name: untrained, encoder: {demo}/models/tiny-bert, evaluate_only: true, embedding_sizes: [64], "
                 f"repeats: {{index: {untrained_indexes}, infer: 1}}}}") if untrained_indexes else ""
    return write_grid(folder, f"""
        name: {name}
        data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
        defaults:
          train: {{epochs: 3, learning_rate: 1.0e-3, dropout: 0.1, warmup_steps: 5, batch_size: 16}}
          text: {{max_length: 64}}
          encode_batch_size: 128
          index: {{type: flat}}
          checkpoint: {{every_steps: {every_steps}}}
        blocks:
          - {{name: trained, encoder: {demo}/models/tiny-bert, embedding_sizes: [64]}}
          {evaluated}
    """, f"{name}.yaml")


class HeldTraining:
    """DPR_HPC_HOLD_TRAINING for the jobs a test submits with `env`: while the gate file exists,
    a training waits at each step boundary (a stop signal still checkpoints it). The training
    runs as long as the test needs by construction, whatever the CPU."""

    def __init__(self, folder: Path, stages: tuple[str, ...] = ()) -> None:
        """`stages` (index, infer) are held too, each by a gate of its own, before their work
        (DPR_HPC_HOLD_STAGE): they then run until released, however short their work."""
        from dpr_hpc.resume.signals import HOLD_ENV, HOLD_STAGE_ENV

        self.gate = folder / "hold-training"
        self.gate.touch()
        self.stage_gates = {stage: folder / f"hold-{stage}" for stage in stages}
        for gate in self.stage_gates.values():
            gate.touch()
        held_stages = ",".join(f"{stage}={gate}" for stage, gate in self.stage_gates.items())
        self.env = {**os.environ, HOLD_ENV: str(self.gate), HOLD_STAGE_ENV: held_stages}

    def release(self, stage: str = "train") -> None:
        (self.gate if stage == "train" else self.stage_gates[stage]).unlink(missing_ok=True)

    def hold_after_a_checkpoint(self, work: Path) -> dict:
        """Lets the held training run until it has written a checkpoint, then holds it again
        (a few steps on at most); its progress.json then."""
        self.release()
        progress = wait_for(lambda: training_progress(work, checkpointed=True), 600, "the training's first checkpoint", every_s=0.05)
        self.gate.touch()
        return progress


def training_progress(work: Path, checkpointed: bool = False) -> dict | None:
    """The running training's progress.json (written at its start and at each checkpoint)."""
    for path in work.glob("runs/store/train/*/r0/attempts/*/progress.json"):
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced atomically, but may vanish with its attempt
            continue
        if progress.get("last_checkpoint") or not checkpointed:
            return progress
    return None


def job_node(job_id: str) -> str:
    """The node SLURM runs (or ran) the job on; "" while it has none."""
    shown = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    return shown


def running_on(work: Path, grid: Path, stage: str) -> dict | None:
    """The grid's `stage` job once SLURM runs it on a node (status's row, with "node")."""
    job = next(j for j in status(work, grid) if j["stage"] == stage)
    node = job_node(job["job_id"])
    return {**job, "node": node} if node and job["state"] == "RUNNING" else None


def assert_every_job_done_once(work: Path, jobs: list[dict]) -> list[dict]:
    """Every job COMPLETED with one record, written by the one SLURM job the ledger submitted for
    it (a requeue keeps its id): nothing lost and nothing run twice. The records."""
    from dpr_hpc.tracking.ledger import Ledger
    from dpr_hpc.store.paths import StageStore

    assert [j["state"] for j in jobs] == ["COMPLETED"] * len(jobs), [(j["stage"], j["state"], j["detail"]) for j in jobs]
    ledger = Ledger.read(StageStore.at(work / "runs")).entries
    assert len(ledger) == len(jobs) and all(len(history) == 1 for history in ledger.values()), ledger
    done = records(work)
    assert sorted(map(written_by, done)) == sorted(h[0]["job_id"] for h in ledger.values())
    return done


def written_by(record: dict) -> str:
    """The job id the ledger records for the SLURM job that wrote `record`: an array task's is
    <array id>_<task> (its own SLURM_JOB_ID is another number), a plain job's its id."""
    node = record["node"]
    return f"{node['slurm_array_job_id']}_{node['slurm_array_task_id']}" if "slurm_array_task_id" in node else node["slurm_job_id"]
