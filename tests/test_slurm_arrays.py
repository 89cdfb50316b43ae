"""Job arrays (plan.ArrayGroup) on SLURM without a cluster: fake sbatch/squeue/sacct/scancel on
PATH, and squeue/sacct lines as SLURM prints array tasks (`123_4`, a pending range `123_[5-9%2]`,
sacct's JobIDRaw that names the array for its last task). The real cluster's test is in
test_multinode.py."""

from __future__ import annotations

import pytest

import array_plan
from conftest import run_cli, write_grid
from fake_slurm import install
from dpr_hpc.backends import slurm
from dpr_hpc.planning.plan import Plan
from dpr_hpc.store.paths import StageStore
from dpr_hpc.tracking import slurm_queue
from dpr_hpc.tracking.ledger import Ledger

# Queues every submission PENDING with the tag of its --comment, an array as SLURM lists one whose
# tasks have not started (`<id>_[0-N%K]`), and keeps each script as script.<id>.
SBATCH = r'''n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 100); n=$((n+1)); echo $n > "$FAKE_SLURM/count"
script="${@: -1}"; cp "$script" "$FAKE_SLURM/script.$n"
tag=$(sed -n "s/^#SBATCH --comment=//p" "$script"); array=$(sed -n "s/^#SBATCH --array=//p" "$script")
if [ -n "$array" ]; then id="${n}_[$array]"; else id=$n; fi
echo "$id|PENDING||0:00|Priority|$tag" >> "$FAKE_SLURM/queue"; echo "Submitted batch job $n"'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "BACKOFF_S", 0.0)
    monkeypatch.setattr(Plan, "array_groups", array_plan.index_arrays)
    monkeypatch.setenv(array_plan.PARALLEL_ENV, "2")
    return install(tmp_path / "fake-slurm", monkeypatch, {"sbatch": SBATCH, "sacctmgr": "exit 1", "scontrol": "exit 1", "scancel": "exit 0"})


def three_index_repeats(folder):
    """A trained and an untrained cell, each with three index repeats: two arrays, one after
    the training and one with nothing to wait on."""
    return write_grid(folder, """
        name: g
        data: {train: train.json, dev: dev.json}
        blocks:
          - {name: trained, encoder: x/y, embedding_sizes: [8], repeats: {index: 3, infer: 1}}
          - {name: untrained, encoder: x/y, embedding_sizes: [8], evaluate_only: true, repeats: {index: 3, infer: 1}}
    """)


def ledger_ids(runs) -> dict[str, list[str]]:
    return {job: [e["job_id"] for e in history] for job, history in Ledger.read(StageStore.at(runs)).entries.items()}


def test_an_array_group_is_one_sbatch_with_one_task_per_job_each_recorded_and_shown_on_one_line(fake_slurm, cached_x_y, data_files, tmp_path, capsys):
    grid = three_index_repeats(data_files)
    runs = tmp_path / "runs"
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", runs)
    assert code == 0, out + err
    # train 101; its index array 102 after it, its infer 103 after task 0; the untrained index array
    # 104 with nothing to wait on, its infer 105 after task 0.
    assert "submitted 3 tasks as job array 102 (--array=0-2%2) after 101" in out
    assert "submitted 3 tasks as job array 104 (--array=0-2%2)\n" in out
    assert "9 submitted" in out and int((fake_slurm / "count").read_text()) == 105
    scripts = {n: (fake_slurm / f"script.{n}").read_text() for n in range(101, 106)}
    assert "#SBATCH --array=0-2%2" in scripts[102] and "#SBATCH --dependency=afterok:101\n" in scripts[102]
    assert "#SBATCH --array=0-2%2" in scripts[104] and "--dependency" not in scripts[104]
    assert sorted(line for s in (scripts[103], scripts[105]) for line in s.splitlines() if "dependency" in line) == [
        "#SBATCH --dependency=afterok:102_0", "#SBATCH --dependency=afterok:104_0"]
    ids = ledger_ids(runs)
    assert sorted(h[0] for job, h in ids.items() if job.startswith("index/")) == ["102_0", "102_1", "102_2", "104_0", "104_1", "104_2"]
    store = StageStore.at(runs)
    tasks = sorted(store.root.glob("arrays/index/*/*.tasks.json"))
    assert len(tasks) == 2  # the mapping index -> stage job, beside each array's logs

    code, out, _ = run_cli(capsys, "status", grid, "--runs-root", runs)
    lines = out.splitlines()
    assert sum("0/3 done, 3 pending" in line and line.startswith("index ") for line in lines) == 2
    assert not [line for line in lines if " 102_" in line or " 104_" in line]  # no row per task
    code, verbose, _ = run_cli(capsys, "status", grid, "--runs-root", runs, "--verbose")
    assert sum(" 102_" in line or " 104_" in line for line in verbose.splitlines()) == 6


def test_a_failed_task_reruns_alone_and_cancel_cancels_each_task_the_grid_owns(fake_slurm, cached_x_y, data_files, tmp_path, capsys):
    grid = three_index_repeats(data_files)
    runs = tmp_path / "runs"
    run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", runs)
    # The untrained array 104: task 0 running, task 1 failed, task 2 still in the array's pending range.
    (fake_slurm / "sacct.out").write_text("\n".join([
        "101|RUNNING|0:0|n1|00:01:00|None|101",
        "102|PENDING|0:0|None assigned|00:00:00|Dependency|102_[0-2%2]",
        "103|PENDING|0:0|None assigned|00:00:00|Dependency|103",
        "106|RUNNING|0:0|n2|00:00:30|None|104_0",
        "107|FAILED|1:0|n3|00:00:05|None|104_1",
        "104|PENDING|0:0|None assigned|00:00:00|JobArrayTaskLimit|104_[2%2]",
        "105|PENDING|0:0|None assigned|00:00:00|Dependency|105",
    ]) + "\n")
    code, out, _ = run_cli(capsys, "status", grid, "--runs-root", runs)
    assert "0/3 done, 1 running, 1 pending, 1 failed" in out and "0/3 done, 3 pending" in out

    code, out, _ = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", runs)
    assert code == 1 and "job 104_1 ended FAILED without a result; --retry-failed resubmits it" in out and "0 submitted" in out
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", runs, "--retry-failed")
    assert code == 0 and "1 submitted" in out, out + err
    rerun = (fake_slurm / "script.106").read_text()
    assert "--array" not in rerun  # alone: a plain job
    assert [h for job, h in ledger_ids(runs).items() if job.startswith("index/") and len(h) > 1] == [["104_1", "106"]]

    (fake_slurm / "scancel.args").unlink(missing_ok=True)
    code, out, _ = run_cli(capsys, "cancel", grid, "--runs-root", runs)
    cancelled = (fake_slurm / "scancel.args").read_text().split()
    assert set(cancelled) == {"101", "102_0", "102_1", "102_2", "103", "104_0", "104_2", "105", "106"}


def test_a_job_after_every_task_waits_on_the_array_id(fake_slurm, cached_x_y, data_files, tmp_path, capsys, monkeypatch):
    """As the corpus merge waits on all its shards: afterok on the array, not on each task."""
    planned = Plan.dependencies

    def after_every_index(self, job):
        if job.stage != "infer":
            return planned(self, job)
        return tuple(j for j in self.jobs() if j.stage == "index" and j.key == self.upstream_keys(job)["index"])

    monkeypatch.setattr(Plan, "dependencies", after_every_index)
    code, out, err = run_cli(capsys, "submit", three_index_repeats(data_files), "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert code == 0, out + err
    dependencies = sorted(line for n in (103, 105) for line in (fake_slurm / f"script.{n}").read_text().splitlines() if "dependency" in line)
    assert dependencies == ["#SBATCH --dependency=afterok:102", "#SBATCH --dependency=afterok:104"]


def test_dry_run_shows_one_array_script_naming_its_tasks(fake_slurm, cached_x_y, data_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "submit", three_index_repeats(data_files), "--dry-run", "--runs-root", tmp_path / "runs")
    assert code == 0 and out.count("#SBATCH --array=0-2%2") == 2 and out.count("# task 2: index/") == 2
    assert "%A_%a_0_log.out" in out


# What squeue and sacct print for the tasks of array 700 (three tasks, at most two at once): task 0
# running, task 1 done, task 2 pending on the array's own line. sacct gives the array's last task
# the array's raw id (700), so JobIDRaw is no key for a task.
SACCT_ARRAY = """701|RUNNING|0:0|node1|00:00:05|None|700_0
702|COMPLETED|0:0|node2|00:00:09|None|700_1
700|PENDING|0:0|None assigned|00:00:00|JobArrayTaskLimit|700_[2%2]
"""


def test_sacct_lines_of_array_tasks_read_per_task_and_the_array_is_asked_for_once(fake_slurm):
    (fake_slurm / "sacct.out").write_text(SACCT_ARRAY)
    view = slurm_queue.query(["700_0", "700_1", "700_2"])
    assert {j: (i.state, i.node) for j, i in view.jobs.items()} == {
        "700_0": ("RUNNING", "node1"), "700_1": ("COMPLETED", "node2"), "700_2": ("PENDING", "")}
    assert view.jobs["700_2"].reason == "JobArrayTaskLimit" and "700" not in view.jobs
    args = (fake_slurm / "sacct.args").read_text().split()
    assert args[args.index("-j") + 1] == "700" and args[args.index("-o") + 1].endswith(",JobID")


def test_squeue_lines_of_array_tasks_and_pending_ranges_read_per_task(fake_slurm):
    (fake_slurm / "sacct.fail").write_text("sacct: error: Slurm accounting storage is disabled\n")
    (fake_slurm / "queue").write_text("700_0|RUNNING|node1|0:05|None|dpr-hpc:abc\n700_[3-5,8%2]|PENDING||0:00|JobArrayTaskLimit|dpr-hpc:abc\n")
    view = slurm_queue.query(["700_0", "700_4", "700_8", "700_6"])
    assert {j: i.state for j, i in view.jobs.items()} == {"700_0": "RUNNING", "700_4": "PENDING", "700_8": "PENDING"}
    assert slurm_queue.queued_by_tag() == {"abc": "700"}  # the array's tag names the array


@pytest.mark.parametrize(("shown", "ids"), [
    ("123", ["123"]), ("123_4", ["123_4"]), ("123_[5-7%2]", ["123_5", "123_6", "123_7"]),
    ("123_[1,3-4]", ["123_1", "123_3", "123_4"]), ("123_[9]", ["123_9"]),
])
def test_listed_ids_expand_a_pending_range(shown, ids):
    assert slurm_queue.listed_ids(shown) == ids and {slurm_queue.array_job_id(i) for i in ids} == {"123"}


def test_accounting_of_array_tasks_is_keyed_by_task_with_its_steps_peak_rss(monkeypatch):
    out = "\n".join([
        "701|COMPLETED|2026-11-26T10:38:00|2026-11-26T10:38:10|2026-11-26T10:38:20|00:00:10|00:05.000||2G|cpu=1,mem=2G,node=1|node1|700_0",
        "701.batch|COMPLETED|2026-11-26T10:38:10|2026-11-26T10:38:10|2026-11-26T10:38:20|00:00:10|00:05.000|20480K|||node1|700_0.batch",
        "700|COMPLETED|2026-11-26T10:38:00|2026-11-26T10:38:30|2026-11-26T10:38:40|00:00:10|00:05.000||2G|cpu=1,mem=2G,node=1|node2|700_1",
    ])
    calls = []
    monkeypatch.setattr(slurm_queue, "_run", lambda command: calls.append(command) or out)
    found = slurm_queue.accounting(["700_0", "700_1"])
    assert calls[0][calls[0].index("-j") + 1] == "700"
    assert found["700_0"].max_rss_mb == 20.0 and found["700_0"].queue_wait_s == 10.0 and found["700_1"].node_list == "node2"
