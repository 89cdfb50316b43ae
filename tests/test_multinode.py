"""The SLURM backend on a cluster of several nodes (DPR_HPC_TEST_NODES=3, as CI runs it): each node
a slurmd with its own hostname and pid space, all sharing this machine's filesystem as a
cluster's nodes share NFS. Jobs land on several nodes; a node fails under a training; index and
infer are requeued onto other nodes; a second host submits the same grid; the controller
restarts. Each test waits on job states, never on sleeps, and ends with every job COMPLETED,
nothing lost and nothing run twice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slurmtools import (PROFILE, HeldTraining, assert_every_job_done_once, cli, grid_with_training, records, running_on, status,
                        wait_for, wait_until_settled)

pytestmark = pytest.mark.slow


@pytest.fixture
def three_nodes(slurm_cluster):
    if len(slurm_cluster.nodes) < 3:
        pytest.skip(f"needs the 3-node test cluster (DPR_HPC_TEST_NODES=3, as CI sets); this one has {len(slurm_cluster.nodes)}")
    return slurm_cluster


def submit(work, grid, held: HeldTraining) -> str:
    return cli("submit", grid, "--backend", "slurm", "--profile", PROFILE, cwd=work, check=True, env=held.env).stdout


def test_one_grids_jobs_land_on_several_nodes_and_a_second_host_submits_nothing_twice(three_nodes, demo_assets, tmp_path):
    """The held training and the untrained cell's two index repeats run at once: three 1-CPU
    jobs, and a node has two CPUs, so they take at least two nodes. Every record names the node
    it ran on (its hostname is the node's). A submit from another host meanwhile adds nothing."""
    held = HeldTraining(tmp_path)
    grid = grid_with_training(tmp_path, demo_assets, "spread", untrained_indexes=2)
    assert "6 submitted" in submit(tmp_path, grid, held)
    wait_for(lambda: running_on(tmp_path, grid, "train"), 600, "the training to run")

    other_host = subprocess.run(
        ["unshare", "--uts", "bash", "-c", 'hostname login2 && exec "$@"', "--",
         sys.executable, "-m", "dpr_hpc", "submit", str(grid), "--backend", "slurm", "--profile", str(PROFILE)],
        cwd=tmp_path, capture_output=True, text=True, env=held.env)
    assert other_host.returncode == 0 and "0 submitted" in other_host.stdout, other_host.stdout + other_host.stderr

    wait_for(lambda: len(records(tmp_path)) == 3, 900, "the untrained cell's jobs to finish beside the held training")
    held.release()
    done = assert_every_job_done_once(tmp_path, wait_until_settled(tmp_path, grid))
    nodes = {r["node"]["slurm_node"] for r in done}
    assert len(nodes) >= 2, nodes
    assert all(r["node"]["hostname"] == r["node"]["slurm_node"] for r in done)
    assert {j["node"] for j in status(tmp_path, grid)} == nodes  # status names each job's node


def test_a_node_failing_under_a_training_requeues_it_onto_another_node_from_its_checkpoint(three_nodes, demo_assets, tmp_path):
    """The node a training runs on fails (scontrol: down, then drained so that it stays out):
    SLURM requeues the same job onto another node, the training resumes from its checkpoint
    there, and its index and infer then run."""
    held = HeldTraining(tmp_path)
    grid = grid_with_training(tmp_path, demo_assets, "nodefail")
    submit(tmp_path, grid, held)
    train = wait_for(lambda: running_on(tmp_path, grid, "train"), 600, "the training to run")
    checkpointed = held.hold_after_a_checkpoint(tmp_path)
    failed = train["node"]
    three_nodes.run("scontrol", "update", f"nodename={failed}", "state=down", "reason=test: node failure")
    three_nodes.run("scontrol", "update", f"nodename={failed}", "state=drain", "reason=test: node failure")
    moved = wait_for(lambda: (r := running_on(tmp_path, grid, "train")) and r["node"] != failed and r, 900,
                     "the training to run again on another node")
    held.release()
    done = assert_every_job_done_once(tmp_path, wait_until_settled(tmp_path, grid))
    (record,) = [r for r in done if r["stage"] == "train"]
    segments = record["details"]["segments"]
    assert [s["hostname"] for s in segments] == [failed, moved["node"]]
    assert {s["job_id"] for s in segments} == {train["job_id"]} and segments[-1]["slurm_restart_count"] >= 1
    assert segments[1]["first_step"] >= checkpointed["step"] > 0  # from its checkpoint, not from step 0
    assert sum(s["steps"] for s in segments) - record["metrics"]["steps"] == segments[0]["first_step"] + segments[0]["steps"] - segments[1]["first_step"]
    assert record["node"]["slurm_node"] == moved["node"]


def test_index_and_infer_requeued_while_running_restart_on_another_node(three_nodes, demo_assets, tmp_path):
    """scontrol requeue of a running index, then of a running infer (each node drained first, so
    the job must restart elsewhere): each runs again on another node and completes once. Each is
    held before its work (DPR_HPC_HOLD_STAGE) until it has been seen running on the second node:
    an infer's work takes 2 s, less than a status poll may need to see it running at all."""
    held = HeldTraining(tmp_path, stages=("index", "infer"))
    held.release()
    grid = grid_with_training(tmp_path, demo_assets, "requeue")
    submit(tmp_path, grid, held)
    moves = {}
    for stage in ("index", "infer"):
        first = wait_for(lambda: running_on(tmp_path, grid, stage), 900, f"the {stage} job to run")
        three_nodes.run("scontrol", "update", f"nodename={first['node']}", "state=drain", "reason=test: requeue elsewhere")
        three_nodes.run("scontrol", "requeue", first["job_id"])
        again = wait_for(lambda: (r := running_on(tmp_path, grid, stage)) and r["node"] != first["node"] and r, 900,
                         f"the requeued {stage} job to run on another node")
        three_nodes.resume_nodes()
        held.release(stage)
        moves[stage] = (first["node"], again["node"], first["job_id"])
    done = assert_every_job_done_once(tmp_path, wait_until_settled(tmp_path, grid))
    for stage, (before, after, job_id) in moves.items():
        (record,) = [r for r in done if r["stage"] == stage]
        assert record["node"]["slurm_node"] == after != before and record["node"]["slurm_job_id"] == job_id
        assert int(record["node"]["slurm_restart_count"]) >= 1


def test_the_controller_restarting_mid_grid_shows_unknown_then_the_grid_completes(three_nodes, demo_assets, tmp_path):
    """slurmctld (and slurmdbd beside it, as when a head node restarts) stop while a training
    runs: status cannot know the jobs' states and says UNKNOWN, never FAILED; the training goes
    on, and once the controller is back the grid completes."""
    held = HeldTraining(tmp_path)
    grid = grid_with_training(tmp_path, demo_assets, "restart")
    submit(tmp_path, grid, held)
    wait_for(lambda: running_on(tmp_path, grid, "train"), 600, "the training to run")
    three_nodes.stop_controller()
    try:
        shown = status(tmp_path, grid)
        assert [j["state"] for j in shown] == ["UNKNOWN"] * 3, shown
    finally:
        three_nodes.start_controller()
    held.release()
    assert_every_job_done_once(tmp_path, wait_until_settled(tmp_path, grid))
