"""Completion is decided by checked records in the stage store: provenance makes a record STALE,
a read error makes it UNREADABLE (and stops submit), markers and claims tell FAILED, RUNNING
and INTERRUPTED apart, and the plan shares stage jobs between cells whose stages agree."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_grid, cache_hub_model
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import StageJob, make_plan
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.store.records import Records, describe_artifacts, make_record, write_record
from dpr_hpc.store.bindings import save_plan
from dpr_hpc.tracking.status import stage_states

FIGURES = dict(metrics={"epoch_loss": [1.0], "num_passages": 1, "num_questions": 1},
               timings={"ttt_s": 1.0, "encode_s": 1, "index_build_s": 1, "pei_s": 2, "ita_mean_ms": 1, "ita_sd_ms": 0})


@pytest.fixture
def run(data_files, tmp_path):
    return planned_run(data_files, tmp_path)


@pytest.fixture
def run_of_a_cached_model(hub_cache, demo_assets, data_files, tmp_path):
    """`run`, with its hub model in the hub cache first (a submit refuses it otherwise)."""
    cache_hub_model(hub_cache, "bert-base-uncased", demo_assets / "models" / "tiny-bert")
    return planned_run(data_files, tmp_path)


def planned_run(data_files, tmp_path):
    path = write_grid(data_files, """
        name: g
        data: {train: train.json, dev: dev.json}
        blocks:
          - {name: b, encoder: bert-base-uncased, embedding_sizes: [64], repeats: {index: 2}}
    """)
    plan = make_plan(load_grid(path))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, path)
    return layout, plan, plan.cells[0]


def job_of(plan, stage: str, repeat: int = 0) -> StageJob:
    return StageJob(stage, plan.keys[plan.cells[0].cell_id][stage], repeat)


def complete(layout, plan, job: StageJob, artifact: str | None = "out.txt", **overrides) -> dict:
    """A record for `job` as the runner writes it: inputs, upstream digests, artifacts."""
    folder = layout.store.job(job)
    attempt = folder.working_attempt(None)
    if artifact:
        (attempt.dir / artifact).write_text("output")
    records = Records(layout.store)
    upstream = {up.id: records.check(up).digest for up in plan.inputs(job)}
    dev = plan.cells[0].data_path("dev")
    inputs = {"dev_data": {"kind": "file", "path": str(dev), "sha256": records.hashes.file(dev)}} if job.stage != "train" else {}
    record = make_record(plan.cells[0], job, attempt=attempt.number, inputs=inputs, upstream=upstream, node=node_tags(),
                         started_at=now_iso(), finished_at=now_iso(),
                         artifacts=describe_artifacts(attempt, [artifact] if artifact else []), **FIGURES)
    record.update(overrides)
    write_record(folder, attempt, record)
    return record


def states(layout, plan) -> dict[str, str]:
    return {f"{s.job.stage}/r{s.job.repeat}": s.state for s in stage_states(layout, plan).states}


def test_nothing_run_is_pending(run):
    layout, plan, _ = run
    assert set(states(layout, plan).values()) == {"PENDING"}


def test_complete_records_stale_ones_and_unreadable_ones(run):
    layout, plan, _ = run
    train = job_of(plan, "train")
    complete(layout, plan, train)
    assert states(layout, plan)["train/r0"] == "COMPLETED"
    complete(layout, plan, train, key="0" * 20)
    assert states(layout, plan)["train/r0"] == "STALE"
    record = complete(layout, plan, train)
    (layout.store.job(train).attempt(record["attempt"]).dir / "out.txt").write_text("truncat")
    report = stage_states(layout, plan)
    assert report.jobs[train].state == "STALE" and "out.txt has 7 bytes, recorded 6" in report.jobs[train].detail
    layout.store.job(train).result.write_text('{"schema": 2, "stage"')  # broken JSON: not guessed at
    assert states(layout, plan)["train/r0"] == "UNREADABLE"


def test_a_rewritten_or_removed_upstream_record_makes_its_dependants_stale(run):
    layout, plan, _ = run
    train, index, infer = job_of(plan, "train"), job_of(plan, "index"), job_of(plan, "infer")
    for job in (train, index, infer):
        complete(layout, plan, job)
    assert states(layout, plan) == {"train/r0": "COMPLETED", "index/r0": "COMPLETED", "index/r1": "PENDING", "infer/r0": "COMPLETED"}
    complete(layout, plan, train)  # a rerun of the training: a new attempt, a new record
    report = stage_states(layout, plan)
    assert (report.jobs[index].state, report.jobs[infer].state) == ("STALE", "STALE")
    assert "upstream train" in report.jobs[index].detail and "rerun since" in report.jobs[index].detail
    complete(layout, plan, index)
    complete(layout, plan, infer)
    assert states(layout, plan)["infer/r0"] == "COMPLETED"
    removed = layout.store.job(index)
    removed.result.unlink()
    removed.latest_attempt().record.unlink()  # its attempt's twin too: otherwise it is promoted (results.promote)
    report = stage_states(layout, plan)
    assert report.jobs[infer].state == "STALE" and "upstream index" in report.jobs[infer].detail


def test_an_edited_input_makes_the_records_that_read_it_stale(run):
    layout, plan, cell = run
    for job in (job_of(plan, "train"), job_of(plan, "index"), job_of(plan, "infer")):
        complete(layout, plan, job)
    dev = cell.data_path("dev")
    dev.write_text(dev.read_text().replace('"a"', '"b"'))
    report = stage_states(layout, plan)
    assert report.jobs[job_of(plan, "train")].state == "COMPLETED"  # reads the train file only
    assert report.jobs[job_of(plan, "index")].state == "STALE"
    assert "dev_data" in report.jobs[job_of(plan, "index")].detail and "changed since it ran" in report.jobs[job_of(plan, "index")].detail


def test_failed_stage_blocks_its_dependants(run):
    layout, plan, _ = run
    attempt = layout.store.job(job_of(plan, "train")).working_attempt(None)
    attempt.failure.write_text(json.dumps({"error": "ValueError: boom", "host": "n1"}))
    assert states(layout, plan) == {"train/r0": "FAILED", "index/r0": "BLOCKED", "index/r1": "BLOCKED", "infer/r0": "BLOCKED"}


def test_claim_of_a_dead_process_reads_interrupted_and_a_live_one_running(run):
    layout, plan, _ = run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = layout.store.job(job_of(plan, "train")).claim
    claim.parent.mkdir(parents=True, exist_ok=True)
    holder = {"pid": int(dead.stdout), "host": socket.gethostname(), "token": "t", "purpose": "train", "heartbeat": __import__("time").time()}
    claim.write_text(json.dumps(holder))
    assert states(layout, plan)["train/r0"] == "INTERRUPTED"
    claim.write_text(json.dumps({**holder, "pid": os.getpid()}))
    assert states(layout, plan)["train/r0"] == "RUNNING"
    claim.write_text(json.dumps({**holder, "pid": os.getpid(), "host": "elsewhere", "heartbeat": 0}))  # heartbeat long gone
    assert states(layout, plan)["train/r0"] == "INTERRUPTED"


def test_an_unreadable_record_stops_submit_and_nothing_runs(run_of_a_cached_model, capsys, monkeypatch):
    layout, plan, _ = run_of_a_cached_model
    train = job_of(plan, "train")
    complete(layout, plan, train)
    result, real_read = layout.store.job(train).result, Path.read_bytes

    def failing_read(path: Path) -> bytes:
        if path == result:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    before = {p: p.read_bytes() for p in layout.store.root.rglob("*") if p.is_file() and p != result}
    grid = json.loads(layout.plan_file.read_text())["grid_file"]
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", layout.runs_root)
    assert code == 1
    assert str(result) in err and "Input/output error" in err and "nothing was submitted" in err
    assert "Traceback" not in err and "running" not in out
    assert {p: p.read_bytes() for p in before} == before


def test_cells_share_the_jobs_their_stages_agree_on(data_files):
    grid = write_grid(data_files, """
        name: sweep
        data: {train: train.json, dev: dev.json}
        blocks:
          - name: m64
            encoder: bert-base-uncased
            index: {hnsw_m: 64}
            cells: [{embedding_size: 64, index: {ef_search: 32}}, {embedding_size: 64, index: {ef_search: 128}}, {embedding_size: 64, index: {ef_search: 256}}]
          - name: m512
            encoder: bert-base-uncased
            index: {hnsw_m: 512}
            cells: [{embedding_size: 64, index: {ef_search: 32}}, {embedding_size: 64, index: {ef_search: 128}}, {embedding_size: 64, index: {ef_search: 256}}]
    """)
    plan = make_plan(load_grid(grid))
    stages = [job.stage for job in plan.jobs()]
    assert (stages.count("train"), stages.count("index"), stages.count("infer")) == (1, 2, 6)
    train = next(job for job in plan.jobs() if job.stage == "train")
    assert len(plan.users(train)) == 6
    # The key follows the content of the data, not its path.
    moved = data_files / "moved"
    moved.mkdir()
    for name in ("train.json", "dev.json"):
        (moved / name).write_text((data_files / name).read_text())
    copy = write_grid(moved, grid.read_text().replace("name: sweep", "name: other"), "other.yaml")
    assert make_plan(load_grid(copy)).keys == plan.keys


def test_a_second_grid_file_with_the_same_name_is_refused(run, data_files, capsys):
    layout, _, _ = run
    other = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n", "other.yaml")
    code, out, err = run_cli(capsys, "submit", other, "--backend", "local", "--runs-root", layout.runs_root)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "belongs to another grid file" in err and str(other) in err


def test_status_counts_the_cells_that_left_an_edited_grid(run, data_files, capsys):
    layout, plan, _ = run
    complete(layout, plan, job_of(plan, "train"))
    grid = Path(json.loads(layout.plan_file.read_text())["grid_file"])
    grid.write_text(grid.read_text().replace("embedding_sizes: [64]", "embedding_sizes: [32]"))
    code, out, _ = run_cli(capsys, "status", grid, "--runs-root", layout.runs_root)
    assert code == 0
    assert "1 cell(s) left the grid since an earlier submit: 1 with results" in out
    assert "es32" in out and "es64" not in out.split("left the grid")[0]


@pytest.mark.parametrize("listed, expected", [("3,5", {"gpus_per_node": 1, "visible_gpus": (3,)}), ("", {"gpus_per_node": 0, "visible_gpus": ()})])
def test_local_jobs_get_one_of_the_visible_gpus(run, monkeypatch, listed, expected):
    from dpr_hpc.backends.local import LocalBackend

    layout, plan, _ = run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    params = LocalBackend(layout, plan).executor_parameters()
    assert {k: params[k] for k in expected} == expected


def test_collect_flags_a_median_over_repeats_that_ran_in_different_precisions_or_gpus(run):
    from dpr_hpc.reporting.collect import collect_table

    layout, plan, cell = run
    complete(layout, plan, job_of(plan, "train"))
    complete(layout, plan, job_of(plan, "index", 0), details={"precision": "fp32"})
    complete(layout, plan, job_of(plan, "index", 1), details={"precision": "fp32"})
    complete(layout, plan, job_of(plan, "infer"), details={"precision": "fp32"})
    table = collect_table(layout, plan, median=True)
    assert table["mixed"].isna().all()  # index twice, infer once: nothing mixed
    assert list(collect_table(layout, plan)["precision"]) == ["fp32/fp32", "fp32/-"]

    node = {**node_tags(), "gpu_name": "Tesla V100"}
    complete(layout, plan, job_of(plan, "index", 1), details={"precision": "fp16"}, node=node)
    mixed = collect_table(layout, plan, median=True)["mixed"].iloc[0]
    assert "index precision: fp16, fp32" in mixed and "index gpu:" in mixed and "Tesla V100" in mixed
    assert "infer" not in mixed


def test_collect_names_the_code_of_each_stage_and_flags_repeats_that_ran_different_code(run):
    from dpr_hpc.reporting.collect import collect_table
    from dpr_hpc.provenance import code_label, code_tags

    layout, plan, cell = run
    here = code_label({"code": code_tags()})
    complete(layout, plan, job_of(plan, "train"))
    complete(layout, plan, job_of(plan, "index", 0))
    complete(layout, plan, job_of(plan, "index", 1))
    complete(layout, plan, job_of(plan, "infer"))
    assert list(collect_table(layout, plan)["code"]) == [f"{here}/{here}/{here}", f"{here}/{here}/-"]
    assert collect_table(layout, plan, median=True)["mixed"].isna().all()

    other = {**node_tags(), "code": {"source_sha256": "ab" * 32}}  # an installed copy of other code: no checkout
    complete(layout, plan, job_of(plan, "index", 1), node=other)
    median = collect_table(layout, plan, median=True).iloc[0]
    assert median["mixed"] == f"index code: {', '.join(sorted([here, 'src:abababab']))}"
    assert median["codes"] == f"{here}/{here}/{here},{here}/src:abababab/-"


def test_the_code_tags_name_a_tracked_checkouts_commit_and_edits_and_nothing_for_an_untracked_copy(tmp_path):
    import subprocess

    from dpr_hpc.provenance import _git_state, source_digest

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True, capture_output=True)

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    git("init", "-q")
    assert _git_state(package) == {}  # inside a repository, but not tracked there: not its code
    git("add", "pkg/__init__.py")
    git("commit", "-qm", "one")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    before = source_digest(package)
    assert _git_state(package) == {"git_commit": commit, "git_dirty": False}
    (package / "__init__.py").write_text("x = 2\n")
    assert _git_state(package) == {"git_commit": commit, "git_dirty": True} and source_digest(package) != before


def test_a_local_model_folder_named_by_absolute_path_is_keyed_by_its_content(data_files):
    """An absolute path resolves to itself, so it must not be mistaken for a hub name: its files'
    content enters the train key, and a changed file changes the key."""
    from dpr_hpc.inputs.content import ContentHashes
    from dpr_hpc.planning.stage_keys import stage_inputs, stage_keys

    model = data_files / "models" / "bert"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    grid = write_grid(data_files, f"name: g\ndata: {{train: train.json, dev: dev.json}}\nblocks: [{{name: b, encoder: {model}, embedding_sizes: [8]}}]\n")
    cell = load_grid(grid).cells[0]
    assert cell.hub_models == () and "question_encoder" in stage_inputs(cell, "train")
    before = stage_keys(cell, ContentHashes(None))["train"]
    (model / "config.json").write_text('{"a": 2}')
    assert stage_keys(cell, ContentHashes(None))["train"] != before


def every_job_complete(layout, plan) -> None:
    for job in plan.jobs():
        complete(layout, plan, job)


def test_a_data_folder_moved_with_the_grid_edited_to_it_leaves_every_record_complete(run, data_files):
    """The records name the old path; staleness compares their SHA-256 with the file the
    current plan names for each role, so moved bytes are the same input."""
    layout, plan, _ = run
    every_job_complete(layout, plan)
    moved = data_files / "project"
    moved.mkdir()
    for name in ("train.json", "dev.json"):
        (data_files / name).rename(moved / name)
    grid = data_files / "grid.yaml"
    grid.write_text(grid.read_text().replace("train: train.json, dev: dev.json", "train: project/train.json, dev: project/dev.json"))
    edited = make_plan(load_grid(grid))
    assert list(edited.keys.values()) == list(plan.keys.values())  # keys hash content, never paths
    assert set(states(layout, edited).values()) == {"COMPLETED"}


def test_a_purged_data_file_whose_content_the_prepared_cache_holds_is_not_gone(run, data_files):
    """A scratch purge deletes the dev file after its first job prepared it: the records that
    read it stay complete, as the store still holds that very content; a file purged before it
    was ever prepared is gone."""
    from dpr_hpc.inputs.prepared import load_dev

    layout, plan, cell = run
    every_job_complete(layout, plan)
    dev = cell.data_path("dev")
    kept = dev.read_bytes()
    dev.unlink()
    report = stage_states(layout, plan)
    assert report.jobs[job_of(plan, "index")].state == "STALE" and "dev_data" in report.jobs[job_of(plan, "index")].detail
    assert "is gone" in report.jobs[job_of(plan, "index")].detail
    dev.write_bytes(kept)
    load_dev(dev, layout.store.prepared_cache)
    dev.unlink()
    assert set(states(layout, plan).values()) == {"COMPLETED"}


def failing_stat(monkeypatch, target: Path, code: int) -> None:
    """os.stat (and so Path.stat) of `target` fails with `code`, as on a flaky NFS or Lustre."""
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path) == str(target):
            raise OSError(code, os.strerror(code), str(target))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EACCES])
def test_an_artifact_or_input_that_cannot_be_read_is_unreadable_never_stale(run, monkeypatch, code):
    """Only ENOENT means missing: another error names the file and the reason, and the job and
    the jobs that read it are UNREADABLE, so nothing reruns on a transient error."""
    layout, plan, cell = run
    every_job_complete(layout, plan)
    train = job_of(plan, "train")
    artifact = layout.store.job(train).attempt(1).dir / "out.txt"
    with monkeypatch.context() as patch:
        failing_stat(patch, artifact, code)
        report = stage_states(layout, plan)
    assert {report.jobs[job].state for job in plan.jobs()} == {"UNREADABLE"}
    assert f"{artifact}: {os.strerror(code)}" in report.jobs[train].detail
    dev = cell.data_path("dev")
    with monkeypatch.context() as patch:
        failing_stat(patch, dev, code)
        report = stage_states(layout, plan)
    index = job_of(plan, "index")
    assert report.jobs[train].state == "COMPLETED"  # it reads the train file only
    assert report.jobs[index].state == "UNREADABLE" and f"{dev}: {os.strerror(code)}" in report.jobs[index].detail
    assert set(states(layout, plan).values()) == {"COMPLETED"}  # the error passed: nothing to rerun


def test_an_unreadable_artifact_stops_submit_naming_it_and_nothing_runs(run_of_a_cached_model, capsys, monkeypatch):
    layout, plan, _ = run_of_a_cached_model
    every_job_complete(layout, plan)
    artifact = layout.store.job(job_of(plan, "index", 1)).attempt(1).dir / "out.txt"
    failing_stat(monkeypatch, artifact, errno.EIO)
    # Every record, artifact and spec as it was (the content-hash memo may learn the train file's hash).
    before = {p: p.read_bytes() for p in layout.store.root.rglob("*") if p not in (artifact, layout.store.root / "content-hashes.json") and p.is_file()}
    grid = json.loads(layout.plan_file.read_text())["grid_file"]
    code, out, _ = run_cli(capsys, "status", grid, "--runs-root", layout.runs_root)
    assert code == 0 and "UNREADABLE" in out and f"{artifact}: Input/output error" in out
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", layout.runs_root)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{artifact}: Input/output error" in err and "nothing was submitted" in err
    assert "running" not in out
    assert {p: p.read_bytes() for p in before} == before


def test_an_attempt_complete_but_for_its_result_json_is_the_record_and_submit_runs_nothing(run_of_a_cached_model, capsys):
    """The runner writes attempts/a<n>/record.json, then result.json: a crash between the two
    leaves a complete attempt, which status counts and submit makes the record, not rerun."""
    layout, plan, _ = run_of_a_cached_model
    every_job_complete(layout, plan)
    folder = layout.store.job(job_of(plan, "train"))
    written = folder.result.read_bytes()
    folder.result.unlink()
    assert set(states(layout, plan).values()) == {"COMPLETED"}  # and its dependants' upstream digest still matches
    grid = json.loads(layout.plan_file.read_text())["grid_file"]
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", layout.runs_root)
    assert code == 0, out + err
    assert "local: 0 ran, 4 already complete (skipped)" in out
    assert folder.result.read_bytes() == written and folder.attempt_numbers() == [1]
