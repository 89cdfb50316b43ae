"""The SLURM backend on a cluster of several nodes (DPR_HPC_TEST_NODES=3, as CI runs it): each node
a slurmd with its own hostname and pid space, all sharing this machine's filesystem as a
cluster's nodes share NFS. Jobs land on several nodes; a node fails under a training; index and
infer are requeued onto other nodes; a second host submits the same grid; the controller
restarts. Each test waits on job states, never on sleeps, and ends with every job COMPLETED,
nothing lost and nothing run twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpr_hpc.store.paths import StageStore
from dpr_hpc.tracking.ledger import Ledger
from slurmtools import (PROFILE, REPO, HeldTraining, assert_every_job_done_once, cli, grid_with_training, records, running_on, status,
                        wait_for, wait_until_settled, written_by)

pytestmark = pytest.mark.slow
ARRAY_PLAN = REPO / "tests" / "array_plan.py"


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


def array_cli(work, *args, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """dpr-hpc with each index key's repeats grouped into one job array (tests/array_plan.py)."""
    done = subprocess.run([sys.executable, str(ARRAY_PLAN), *map(str, args)], capture_output=True, text=True, cwd=work,
                          env={**env, "DPR_HPC_TEST_ARRAY_PARALLEL": "4"})
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def test_an_array_group_is_one_sbatch_array_whose_tasks_spread_over_nodes_and_a_failed_task_reruns_alone(three_nodes, demo_assets, tmp_path):
    """A trained cell's four index repeats as one job array (`--array=0-3%4`, afterok on the
    training): its tasks, held before their work, run on several nodes at once; one is killed on
    purpose (scancel: CANCELLED while running), the others complete, and `submit --retry-failed` reruns that one alone, as a
    plain job. Every index repeat then has one record, written once."""
    from conftest import write_grid

    held = HeldTraining(tmp_path, stages=("index",))
    held.release()  # the training runs freely; the index tasks wait at their gate
    grid = write_grid(tmp_path, f"""
        name: arrays
        data: {{train: {demo_assets}/train.json, dev: {demo_assets}/dev.json}}
        defaults:
          train: {{epochs: 1, learning_rate: 1.0e-3, dropout: 0.1, warmup_steps: 2, batch_size: 16}}
          text: {{max_length: 64}}
          encode_batch_size: 128
          index: {{type: flat}}
        blocks:
          - {{name: trained, encoder: {demo_assets}/models/tiny-bert, embedding_sizes: [64], repeats: {{index: 4, infer: 1}}}}
    """, "arrays.yaml")
    out = array_cli(tmp_path, "submit", grid, "--backend", "slurm", "--profile", PROFILE, env=held.env).stdout
    assert "6 submitted" in out and "submitted 4 tasks as job array" in out and "(--array=0-3%4) after" in out, out
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    tasks = {key: history[0]["job_id"] for key, history in ledger.items() if key.startswith("index/")}
    array_id = {job_id.split("_")[0] for job_id in tasks.values()}.pop()
    assert sorted(tasks.values()) == [f"{array_id}_{i}" for i in range(4)]
    (script,) = (tmp_path / "runs" / "store" / "arrays" / "index").glob(f"*/{array_id}_submission.sh")
    assert "#SBATCH --array=0-3%4" in script.read_text().splitlines()

    def running_together() -> list[dict] | None:
        running = [j for j in status(tmp_path, grid) if j["stage"] == "index" and j["state"] == "RUNNING" and j["node"]]
        return running if len(running) == 4 else None

    running = wait_for(running_together, 900, "all four index tasks to run at once (held at their gate)")
    assert len({j["node"] for j in running}) >= 2  # four 1-CPU tasks, two CPUs a node
    killed = next(j for j in running if j["job_id"] == f"{array_id}_3")
    three_nodes.run("scancel", "--signal=KILL", "--full", killed["job_id"])
    # SLURM reads a job killed by scancel as CANCELLED: a task that ended without a result, as a failed one.
    wait_for(lambda: next(j for j in status(tmp_path, grid) if j["job_id"] == killed["job_id"])["state"] == "CANCELLED", 300,
             "the killed task to read CANCELLED")
    held.release("index")
    settled = wait_until_settled(tmp_path, grid)
    assert sorted(j["state"] for j in settled) == ["CANCELLED"] + ["COMPLETED"] * 5, settled
    shown = array_cli(tmp_path, "status", grid, env=held.env).stdout
    assert "3/4 done, 1 cancelled" in shown and f" {array_id}_" not in shown, shown

    again = array_cli(tmp_path, "submit", grid, "--backend", "slurm", "--profile", PROFILE, "--retry-failed", env=held.env).stdout
    assert "1 submitted" in again and "job array" not in again, again
    assert_every_job_done_once_but(tmp_path, wait_until_settled(tmp_path, grid), rerun=killed["job_id"])
    done = [r for r in records(tmp_path) if r["stage"] == "index"]
    assert sorted(r["node"].get("slurm_array_task_id", "-") for r in done) == ["-", "0", "1", "2"]  # the rerun is a plain job
    assert len({r["node"]["slurm_node"] for r in done}) >= 2
    # A task's log, written in the array's folder, is its stage job's log (linked from its jobs/).
    log = array_cli(tmp_path, "logs", "*", "--grid", grid, "--stage", "index", "--repeat", "1", env=held.env)
    assert f"{array_id}_1_0_log.out" in log.stdout + log.stderr and "submitit INFO" in log.stdout + log.stderr, log.stdout + log.stderr
    print(f"\nsbatch: {next(line for line in script.read_text().splitlines() if line.startswith('#SBATCH --array'))}")
    print(shown.splitlines()[-2] if "done" in shown.splitlines()[-2] else shown)
    print(array_cli(tmp_path, "status", grid, env=held.env).stdout)
    print("index nodes:", sorted((r["repeat"], r["node"]["slurm_node"], r["node"]["slurm_job_id"]) for r in done))


def assert_every_job_done_once_but(work, jobs: list[dict], rerun: str) -> None:
    """Every job COMPLETED with one record; each stage job submitted once, but the task `rerun`,
    which has a second submission, and its record is the second's."""
    assert [j["state"] for j in jobs] == ["COMPLETED"] * len(jobs), [(j["stage"], j["state"], j["detail"]) for j in jobs]
    ledger = Ledger.read(StageStore.at(work / "runs")).entries
    twice = {key: [e["job_id"] for e in history] for key, history in ledger.items() if len(history) > 1}
    assert len(ledger) == len(jobs) and len(twice) == 1 and [h[0] for h in twice.values()] == [rerun] and len(list(twice.values())[0]) == 2, ledger
    assert sorted(map(written_by, records(work))) == sorted(history[-1]["job_id"] for history in ledger.values())


def test_a_corpus_grid_queues_each_shard_stage_as_one_array_over_several_nodes_and_merges_after_every_search(three_nodes, demo_assets, tmp_path):
    """jobs/demo-corpus.yaml's corpus evaluation (3,000 passages in 3 shards, 3 at once) after a
    one-epoch training, on SLURM: encode-shard and search-shard each go out as one sbatch array
    (`--array=0-2%3`), encode's after the training, search's after encode's, and the merge after
    the search array. The encode tasks, held before their work until all three run, take at
    least two nodes (three 1-CPU tasks, two CPUs a node). Every stage job completes once; status
    shows each array as one line; collect has the corpus columns."""
    from conftest import write_grid

    held = HeldTraining(tmp_path, stages=("encode-shard",))
    held.release()  # the training runs freely; the encode tasks wait at their gate
    grid = write_grid(tmp_path, f"""
        name: corpus-slurm
        data: {{train: {demo_assets}/train.json, dev: {demo_assets}/dev.json}}
        defaults:
          train: {{epochs: 1, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: 2, seed: 7, batch_size: 16}}
          text: {{max_length: 64}}
          encode_batch_size: 128
          corpus:
            passages: {demo_assets}/corpus/passages.tsv
            questions: {demo_assets}/corpus/questions.qa.csv
            shards: 3
            parallel: 3
            top_k: 100
            index: flat
        blocks:
          - {{name: bert, encoder: {demo_assets}/models/tiny-bert, embedding_sizes: [64]}}
    """, "corpus-slurm.yaml")
    out = submit(tmp_path, grid, held)
    assert "10 submitted" in out, out
    arrays = {line.split(":")[0].split("/")[0]: line for line in out.splitlines() if "as job array" in line}
    assert sorted(arrays) == ["encode-shard", "search-shard"] and all("submitted 3 tasks" in line and "(--array=0-2%3) after " in line
                                                                      for line in arrays.values()), out
    ledger = Ledger.read(StageStore.at(tmp_path / "runs")).entries
    first = {key.split("/")[0]: history[0] for key, history in sorted(ledger.items())}
    array_of = {stage: {h[0]["job_id"].split("_")[0] for k, h in ledger.items() if k.startswith(f"{stage}/")} for stage in arrays}
    assert all(len(ids) == 1 for ids in array_of.values()), ledger
    encode_array, search_array = array_of["encode-shard"].pop(), array_of["search-shard"].pop()
    assert sorted(h[0]["job_id"] for k, h in ledger.items() if k.startswith("encode-shard/")) == [f"{encode_array}_{i}" for i in range(3)]
    assert arrays["encode-shard"].endswith(f" after {first['train']['job_id']}"), out
    assert arrays["search-shard"].endswith(f" after {encode_array}"), out  # the whole encode array, not its tasks
    merge_line = next(line for line in out.splitlines() if line.startswith("merge/"))
    assert merge_line.endswith(f"submitted as job {first['merge']['job_id']} after {search_array}"), out
    for stage, array_id in (("encode-shard", encode_array), ("search-shard", search_array)):
        (script,) = (tmp_path / "runs" / "store" / "arrays" / stage).glob(f"*/{array_id}_submission.sh")
        assert "#SBATCH --array=0-2%3" in script.read_text().splitlines()

    def encoding_together() -> list[dict] | None:
        running = [j for j in status(tmp_path, grid) if j["stage"] == "encode-shard" and j["state"] == "RUNNING" and j["node"]]
        return running if len(running) == 3 else None

    running = wait_for(encoding_together, 900, "all three encode-shard tasks to run at once (held at their gate)")
    assert len({j["node"] for j in running}) >= 2, running
    held.release("encode-shard")
    done = assert_every_job_done_once(tmp_path, wait_until_settled(tmp_path, grid))

    shards = sorted((r for r in done if r["stage"] in ("encode-shard", "search-shard")), key=lambda r: (r["stage"], r["metrics"]["shard"]))
    assert [(r["stage"], r["metrics"]["shard"]) for r in shards] == [(s, i) for s in ("encode-shard", "search-shard") for i in range(3)]
    assert {r["node"]["slurm_array_job_id"] for r in shards} == {encode_array, search_array}
    assert sorted(r["node"]["slurm_array_task_id"] for r in shards) == ["0", "0", "1", "1", "2", "2"]
    assert len({r["node"]["slurm_node"] for r in shards if r["stage"] == "encode-shard"}) >= 2
    assert sum(r["metrics"]["num_passages"] for r in shards if r["stage"] == "encode-shard") == 3000
    # afterok on an array's id waits for every task: each search began after the last encode
    # ended, and the merge after the last search.
    (merge,) = [r for r in done if r["stage"] == "merge"]
    ended = {stage: max(r["finished_at"] for r in shards if r["stage"] == stage) for stage in ("encode-shard", "search-shard")}
    assert min(r["started_at"] for r in shards if r["stage"] == "search-shard") >= ended["encode-shard"]
    assert merge["started_at"] >= ended["search-shard"], (merge["started_at"], ended)

    shown = cli("status", grid, cwd=tmp_path, check=True).stdout
    array_lines = [line for line in shown.splitlines() if line.startswith(("encode-shard ", "search-shard "))]
    groups = sorted({h[0]["group"] for h in ledger.values() if "group" in h[0]})  # "<stage>/<its first shard's key>"
    assert array_lines == [f"{stage} {key[:8]} 3/3 done" for stage, _, key in (g.partition("/") for g in groups)], shown
    assert f" {encode_array}_" not in shown and "10 stage jobs: 10 COMPLETED" in shown, shown
    # A task's log, written in its array's folder, is its shard job's log.
    log = cli("logs", "*", "--grid", grid, "--stage", "encode-shard", "--shard", "2", cwd=tmp_path, check=True)
    assert f"{encode_array}_2_0_log.out" in log.stdout + log.stderr and "encoded 1000 passages" in log.stdout + log.stderr, log.stdout + log.stderr

    assert cli("collect", grid, "--out", tmp_path / "results", cwd=tmp_path).returncode == 0
    table = (tmp_path / "results" / "corpus-slurm.csv").read_text().splitlines()
    header = table[0].split(",")
    (row,) = [dict(zip(header, line.split(","))) for line in table[1:]]
    merged = merge["metrics"]
    assert row["corpus_shards"] == "3" and row["corpus_vectors"] == "fp32"
    assert 0 <= float(row["corpus_acc@100"]) <= 1 and float(row["corpus_acc@20"]) == pytest.approx(merged["answer_acc@20"])

    print("\n--- dpr-hpc submit ---\n" + out.rstrip())
    print("--- dpr-hpc status ---\n" + shown.rstrip())
    print("--- shard task records ---")
    for r in shards:
        path = next(p for p in tmp_path.glob(f"runs/store/{r['stage']}/*/*/result.json") if json.loads(p.read_text()) == r)
        print(f"{path.relative_to(tmp_path)}: node {r['node']['slurm_node']}, job {r['node']['slurm_array_job_id']}_{r['node']['slurm_array_task_id']}, "
              f"shard {r['metrics']['shard']}, num_passages {r['metrics']['num_passages']}, attempt {r.get('attempt')}")
    print("--- merged ---\n" + "  ".join(f"{k} {merged[k]:.3f}" for k in sorted((k for k in merged if k.startswith(("answer_acc@", "mrr@"))),
                                                       key=lambda k: (k.startswith("mrr"), int(k.split("@")[1]))))
          + f"  ({merged['num_questions']} questions, {merged['num_passages']} passages, {merged['shards']} shards)")

