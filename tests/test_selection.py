"""Acting on part of a grid: --cell globs, --group and --stage on every command, submit --force
as a rerun request that keeps the earlier attempt, the attempt each row shows, `logs`, and
`status --watch` ending by itself. Records are written as the runner writes them (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, cache_hub_model, run_cli, write_grid
from fake_slurm import install as install_fake_slurm
from dpr_hpc.api.targets import submit_targets
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import StageJob, make_plan
from dpr_hpc.store.records import Records
from dpr_hpc.store.bindings import save_plan
from dpr_hpc.planning.selection import Selection
from test_status import complete

GRID = """
    name: sel
    data: {train: train.json, dev: dev.json}
    blocks:
      - {name: bert, encoder: bert-base-uncased, embedding_sizes: [32, 64], repeats: {index: 2, infer: 2}}
      - {name: tiny, encoder: huawei-noah/TinyBERT_General_4L_312D, embedding_sizes: [48]}
"""


@pytest.fixture
def run(data_files, tmp_path, monkeypatch, hub_cache, demo_assets):
    # The grid names hub models: a submit refuses ones neither cached nor reachable.
    for model in ("bert-base-uncased", "huawei-noah/TinyBERT_General_4L_312D"):
        cache_hub_model(hub_cache, model, demo_assets / "models" / "tiny-bert")
    monkeypatch.chdir(tmp_path)
    grid = write_grid(data_files, GRID)
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "sel")
    save_plan(layout, plan, grid)
    return layout, plan, grid


def cell_of(plan, prefix: str) -> str:
    return next(c.cell_id for c in plan.cells if c.cell_id.startswith(prefix))


def jobs_of(plan, cell_id: str, stage: str) -> list[StageJob]:
    return plan.cell_jobs(cell_id, stage)


def complete_cell(layout, plan, cell_id: str) -> None:
    """Every stage job of a cell complete, upstream first (complete() reads cells[0]'s settings,
    which only the dev file path is taken from: every cell here shares it)."""
    for stage in ("train", "index", "infer"):
        for job in jobs_of(plan, cell_id, stage):
            complete(layout, plan, job)


def status_rows(capsys, runs: Path, *flags: str) -> list[dict]:
    code, out, err = run_cli(capsys, "status", "--runs-root", runs, "--json", *flags)
    assert code == 0, err
    return json.loads(out)[0]["rows"]


def test_status_lists_only_the_selected_cells_and_stages(run, capsys):
    layout, plan, _ = run
    rows = status_rows(capsys, layout.runs_root, "--cell", "bert-base-uncased-es6*", "--stage", "infer")
    assert [(r["cell_id"], r["stage"], r["repeat"]) for r in rows] == [(cell_of(plan, "bert-base-uncased-es64"), "infer", r) for r in (0, 1)]
    rows = status_rows(capsys, layout.runs_root, "--group", "tiny", "--stage", "train,index")
    assert {(r["stage"], r["repeat"]) for r in rows} == {("train", 0), ("index", 0)}
    assert {r["cell_id"] for r in rows} == {cell_of(plan, "tinybert")}
    exact = cell_of(plan, "bert-base-uncased-es32")
    assert {r["cell_id"] for r in status_rows(capsys, layout.runs_root, "--cell", exact)} == {exact}


@pytest.mark.parametrize("flags, message", [
    (["--cell", "roberta*"], "--cell 'roberta*' matches no cell; cells here: bert-base-uncased-es32"),
    (["--group", "electra"], "--group electra: no block of that name; blocks here: bert, tiny"),
    (["--stage", "encode"], "--stage encode: expected one of train, index, infer"),
    (["--cell", "tinybert*", "--group", "bert"], "no cell is picked by all of these together"),
])
def test_a_selection_that_picks_nothing_is_a_usage_error_naming_it(run, capsys, flags, message):
    layout, _, _ = run
    for command in ("status", "collect", "cancel", "report"):
        code, out, err = run_cli(capsys, command, "--runs-root", layout.runs_root, *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (command, err)


def test_force_needs_a_selection_or_force_all(run, capsys):
    _, _, grid = run
    code, _, err = run_cli(capsys, "submit", grid, "--backend", "local", "--force")
    assert code == 2 and "--force-all" in err


def test_a_forced_job_reads_stale_until_a_new_attempt_completes_and_the_old_one_stays(run):
    layout, plan, _ = run
    cell = cell_of(plan, "bert-base-uncased-es64")
    complete_cell(layout, plan, cell)
    indexes = jobs_of(plan, cell, "index")
    records = Records(layout.store)
    targets = submit_targets(plan, Selection((cell,), (), ("index",)).apply([plan])[0], records, force=True)
    assert set(targets.forced) == set(indexes) and targets.jobs == frozenset(indexes) and not targets.upstream
    assert set(targets.turned_stale) == set(jobs_of(plan, cell, "infer"))  # infer reads index r0's output
    records = Records(layout.store)
    for job in indexes:
        check = records.check(job)
        assert check.state == "stale" and "rerun was asked for (submit --force" in check.reason and check.attempt == 1
    assert records.check(jobs_of(plan, cell, "train")[0]).complete
    for job in indexes:
        complete(layout, plan, job)  # the rerun, as the runner writes it: attempt 2
    records = Records(layout.store)
    for job in indexes:
        assert records.check(job).complete and records.check(job).attempt == 2
        assert layout.store.job(job).attempt(1).record.is_file()  # the earlier attempt is kept
    assert records.check(jobs_of(plan, cell, "infer")[0]).state == "stale"


def test_a_selected_job_brings_the_upstream_jobs_it_needs_that_are_not_complete(run):
    layout, plan, _ = run
    cell = cell_of(plan, "bert-base-uncased-es32")
    complete(layout, plan, jobs_of(plan, cell, "train")[0])
    targets = submit_targets(plan, Selection((cell,), (), ("infer",)).apply([plan])[0], Records(layout.store), force=False)
    assert targets.upstream == (jobs_of(plan, cell, "index")[0],)
    assert targets.jobs == frozenset(jobs_of(plan, cell, "infer") + [jobs_of(plan, cell, "index")[0]])


def test_status_and_collect_say_which_attempt_they_show(run, capsys, tmp_path):
    layout, plan, _ = run
    cell = cell_of(plan, "bert-base-uncased-es32")
    complete_cell(layout, plan, cell)
    infer = jobs_of(plan, cell, "infer")[0]
    complete(layout, plan, infer)  # a second attempt of infer r0
    rows = status_rows(capsys, layout.runs_root, "--cell", cell, "--stage", "infer")
    assert [(r["repeat"], r["attempt"]) for r in rows] == [(0, 2), (1, 1)]
    code, _, err = run_cli(capsys, "collect", "--runs-root", layout.runs_root, "--cell", cell, "--out", tmp_path / "out")
    assert code == 0, err
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "sel.csv")
    assert list(table["cell_id"].unique()) == [cell]
    assert list(table["attempt"]) == ["1/1/2", "1/1/1"]


def test_collect_with_stage_keeps_the_figures_of_that_stage_only(run, capsys, tmp_path):
    layout, plan, _ = run
    cell = cell_of(plan, "bert-base-uncased-es32")
    complete_cell(layout, plan, cell)
    code, _, err = run_cli(capsys, "collect", "--runs-root", layout.runs_root, "--cell", cell, "--stage", "index", "--out", tmp_path)
    assert code == 0, err
    import pandas as pd

    table = pd.read_csv(tmp_path / "sel.csv")
    assert table["pei_s"].notna().all() and table["ttt_s"].isna().all() and table["ita_mean_ms"].isna().all()


def test_report_with_stage_leaves_out_the_other_stages_figures_instead_of_calling_them_missing(run, capsys, tmp_path):
    layout, plan, _ = run
    cell = cell_of(plan, "bert-base-uncased-es32")
    complete_cell(layout, plan, cell)
    code, _, err = run_cli(capsys, "report", "--runs-root", layout.runs_root, "--cell", cell, "--stage", "index",
                           "--out", tmp_path, "--baseline", "BERT-32")
    assert code == 0, err
    report = (tmp_path / "sel" / "report.md").read_text()
    efficiency = report.split("## Table 2")[1].split("## Table 3")[0]
    assert "PEI (s)" in efficiency and "TTT (s)" not in efficiency and "ITA" not in efficiency
    assert "missing" not in efficiency
    assert "## Table 3: retrieval\n\nNot in this report" in report
    assert "## Figure 2: total training time\n\nNot in this report: it needs the train stage" in report
    assert not {"figure-ttt.png", "figure-ita.png", "figure-mrr100.png"} & {p.name for p in (tmp_path / "sel").glob("*.png")}
    assert (tmp_path / "sel" / "figure-pei.png").is_file()


def write_log(layout, job: StageJob, job_id: str, text: str, attempt: int | None) -> None:
    folder = layout.store.job(job)
    folder.jobs.mkdir(parents=True, exist_ok=True)
    (folder.jobs / f"{job_id}_0_log.out").write_text(text)
    (folder.jobs / f"{job_id}_0_log.err").write_text(f"err of {job_id}\n")
    if attempt is not None:
        paths = folder.attempt(attempt)
        paths.dir.mkdir(parents=True, exist_ok=True)
        noted = json.loads(paths.job_ids.read_text())["job_ids"] if paths.job_ids.exists() else []
        paths.job_ids.write_text(json.dumps({"job_ids": noted + [job_id]}))


def test_logs_prints_the_newest_attempts_logs_and_any_attempt_asked_for(run, capsys):
    layout, plan, _ = run
    cell = cell_of(plan, "tinybert")
    train = jobs_of(plan, cell, "train")[0]
    write_log(layout, train, "101", "epoch 1/3 first attempt\n", 1)
    write_log(layout, train, "102", "epoch 1/3 second attempt\n", 2)
    write_log(layout, train, "103", "epoch 2/3 resumed\n", 2)
    code, out, err = run_cli(capsys, "logs", "tinybert*", "--runs-root", layout.runs_root, "--stage", "train")
    assert code == 0, err
    assert "first attempt" not in out and out.index("second attempt") < out.index("resumed")
    assert f"==> {layout.store.job(train).jobs / '103_0_log.out'} (attempt 2) <==" in out and "err of 103" in out
    code, out, _ = run_cli(capsys, "logs", cell, "--runs-root", layout.runs_root, "--stage", "train", "--attempt", "1")
    assert "first attempt" in out and "resumed" not in out
    code, out, _ = run_cli(capsys, "logs", cell, "--runs-root", layout.runs_root)  # default: the last stage with a log
    assert code == 0 and "resumed" in out
    code, _, err = run_cli(capsys, "logs", "bert*", "--runs-root", layout.runs_root)
    assert code == 2 and "matches cells bert-base-uncased-es32" in err
    code, _, err = run_cli(capsys, "logs", cell, "--runs-root", layout.runs_root, "--stage", "train", "--repeat", "1")
    assert code == 2 and "--repeat 1: cell" in err and "train has repeats 0 to 0" in err


# Holds what a local submit holds while it works: the run's submit lock, and the claim of the
# job it runs; lets go of the claim, then of the lock, each when the test says so.
HOLDER = """
import sys
from pathlib import Path
from dpr_hpc.store.claims import claim_stage
from dpr_hpc.locks import LockFile
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.store.paths import JobFolder

run, job_dir, stage, key = sys.argv[1:5]
submit = LockFile(Path(run) / "submit.lock", purpose="local submit", heartbeat_s=1).acquire()
claim = claim_stage(JobFolder(Path(job_dir)), StageJob(stage, key, 0))
print("held", flush=True)
sys.stdin.readline()
claim.release()
print("claim released", flush=True)
sys.stdin.readline()
submit.release()
"""


def test_status_watch_ends_by_itself_once_nothing_runs(run):
    layout, plan, _ = run
    train = jobs_of(plan, cell_of(plan, "tinybert"), "train")[0]
    layout.store.job(train).dir.mkdir(parents=True, exist_ok=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(layout.root), str(layout.store.job(train).dir), train.stage, train.key],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    watch = subprocess.Popen([sys.executable, "-m", "dpr_hpc", "status", "--runs-root", str(layout.runs_root), "--group", "tiny", "--watch", "0.1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert watch.stdout.readline().strip() == "3 stage jobs: 1 RUNNING, 2 PENDING"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "claim released"
        # the submit lock still held: a local submit between two jobs, so the watch goes on
        assert watch.stdout.readline().strip() == "3 stage jobs: 3 PENDING"
        holder.stdin.write("\n")
        holder.stdin.flush()
        rest, err = watch.communicate(timeout=60)
    finally:
        holder.kill()
        watch.kill()
    assert watch.returncode == 0, err
    lines = rest.strip().splitlines()
    assert lines[0].startswith("grid sel (") and lines[-1] == "3 stage jobs: 3 PENDING"
    assert sum(1 for line in lines if " PENDING" in line and line.startswith(cell_of(plan, "tinybert"))) == 3


def test_a_meter_feeds_a_progress_bar_with_an_eta_where_one_is_wanted(run, monkeypatch, capsys):
    from dpr_hpc.tracking.progress import Meter, MeterBar, bars_wanted
    from dpr_hpc.errors import UsageError

    layout, plan, _ = run
    folder = layout.store.job(jobs_of(plan, cell_of(plan, "tinybert"), "train")[0])
    attempt = folder.working_attempt(None)
    bar = MeterBar(folder, "[1/3]")
    bar.refresh()  # no meter yet: nothing drawn
    meter = Meter(attempt.meter, "training", "steps", total=40, done=10)
    meter.update(30, force=True)
    bar.refresh()
    assert bar._bar.n == 30 and bar._bar.total == 40
    bar.close()
    assert "[1/3] training:  75%" in capsys.readouterr().err
    monkeypatch.setenv("DPR_HPC_PROGRESS", "lines")
    assert not bars_wanted()
    monkeypatch.setenv("DPR_HPC_PROGRESS", "bar")
    assert bars_wanted()
    monkeypatch.setenv("DPR_HPC_PROGRESS", "yes")
    with pytest.raises(UsageError, match="DPR_HPC_PROGRESS=yes: expected bar or lines"):
        bars_wanted()


def test_a_forced_slurm_submit_queues_the_selected_jobs_only_and_needs_no_retry_flag(run, capsys, tmp_path, monkeypatch):
    """The index repeats of one cell ran before as SLURM jobs that completed; --force queues them
    again (an ended job with a record is not a failure to --retry-failed) and nothing else."""
    from dpr_hpc.tracking.ledger import Ledger

    layout, plan, grid = run
    cell = cell_of(plan, "bert-base-uncased-es64")
    complete_cell(layout, plan, cell)
    with Ledger.locked(layout.store) as ledger:
        for number, job in enumerate(jobs_of(plan, cell, "index")):
            ledger.record(job, str(500 + number))
    bin_dir = install_fake_slurm(tmp_path / "fake-slurm", monkeypatch, {
        "sbatch": 'echo "Submitted batch job 77"',  # the fake logs its arguments to sbatch.args itself
        "sacct": 'printf "500|COMPLETED|0:0|n1|00:01:00|None\\n501|COMPLETED|0:0|n2|00:01:00|None\\n"',
        "squeue": "exit 0", "sacctmgr": "exit 0", "scontrol": "exit 0"})
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "slurm", "--force", "--stage", "index", "--cell", cell,
                             "--runs-root", layout.runs_root)
    assert code == 0, out + err
    assert "slurm: 2 submitted, 0 already complete (skipped), 0 failed, 0 blocked" in out
    assert len((bin_dir / "sbatch.args").read_text().splitlines()) == 2
    assert "a rerun was asked for (submit --force" in out


def test_a_forced_rerun_that_failed_or_stopped_shows_as_such_not_stale(run):
    from dpr_hpc.tracking.status import stage_states

    layout, plan, _ = run
    cell = cell_of(plan, "tinybert")
    complete_cell(layout, plan, cell)
    index = jobs_of(plan, cell, "index")[0]
    submit_targets(plan, [index], Records(layout.store), force=True)
    rerun = layout.store.job(index).working_attempt(1)
    rerun.failure.write_text(json.dumps({"error": "RuntimeError: CUDA out of memory", "host": "gpu7"}))
    state = stage_states(layout, plan).jobs[index]
    assert (state.state, state.node, state.attempt) == ("FAILED", "gpu7", 2)
    assert "its rerun failed: RuntimeError: CUDA out of memory; attempt 1 is still stale (a rerun was asked for" in state.detail
    rerun.failure.unlink()
    rerun.interrupted.write_text(json.dumps({"reason": "stopped by SIGTERM after step 12", "host": "gpu7"}))
    state = stage_states(layout, plan).jobs[index]
    assert (state.state, state.attempt) == ("INTERRUPTED", 2) and state.detail.startswith("its rerun stopped by SIGTERM after step 12")


def test_watch_waits_on_queued_and_running_slurm_jobs_but_not_on_held_ones(run):
    from dpr_hpc.tracking.status import StageState, StatusReport, still_active

    layout, plan, _ = run
    job = jobs_of(plan, cell_of(plan, "tinybert"), "train")[0]

    def active(state: str, job_id: str = "") -> bool:
        return still_active(layout, StatusReport({job: StageState(job, state, job_id=job_id)}, [], "store", ""))

    assert active("RUNNING") and active("REQUEUED") and active("PENDING", "5")
    assert not active("PENDING") and not active("HELD", "5") and not active("COMPLETED", "5")
