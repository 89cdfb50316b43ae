"""User errors are one line and a defined exit code, never a traceback; what would fail inside
a job after its queue wait fails before anything is queued."""

from __future__ import annotations

import json
import os

from pathlib import Path

import pytest

from conftest import ONE_CELL_GRID, cache_hub_model, run_cli, submitted_run, write_grid
from fake_slurm import install as install_fake_slurm
from dpr_hpc.cli.main import EXIT_DEFERRED
from dpr_hpc.inputs.data import iter_records
from dpr_hpc.errors import DataFormatError
from dpr_hpc.grid import load_grid


def _one_line(err: str) -> bool:
    return err.startswith("dpr-hpc: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("limit", ["inf", "nan", "-1", "0"])
def test_a_time_limit_that_is_not_a_positive_finite_number_is_refused(data_files, tmp_path, capsys, limit):
    grid = write_grid(data_files, ONE_CELL_GRID)
    code, _, err = run_cli(capsys, "submit", grid, "--backend", "local", "--time-limit", limit, "--runs-root", tmp_path / "runs")
    assert code == 2 and _one_line(err) and "--time-limit" in err


@pytest.mark.parametrize("damage", ["{not json", '{"c/train/r0": "101"}', "[1, 2]"])
def test_a_damaged_ledger_line_is_skipped_with_a_warning_naming_it(data_files, tmp_path, capsys, caplog, damage):
    """One damaged line (a cut append, a stray edit) must not lock every command out: it is
    named, once, and the entries around it are read."""
    layout, _, train = submitted_run(data_files, tmp_path, "101")
    ledger = layout.store.ledger_file
    ledger.write_text(damage + "\n" + ledger.read_text())  # damaged, not a last append cut short
    code, out, err = run_cli(capsys, "status", layout.root)
    assert code == 0 and "Traceback" not in err
    assert f"{ledger}: line 1 is not a ledger entry; skipped" in caplog.text and caplog.text.count("line 1") == 1
    from dpr_hpc.tracking.ledger import Ledger

    assert Ledger.read(layout.store).latest(train)["job_id"] == "101"


def test_a_ledger_that_cannot_be_read_at_all_is_one_line_naming_it(data_files, tmp_path, capsys):
    layout, _, _ = submitted_run(data_files, tmp_path, "101")
    ledger = layout.store.ledger_file
    ledger.write_bytes(b"\xff\xfe not text")
    code, _, err = run_cli(capsys, "status", layout.root)
    assert code == 2 and _one_line(err) and str(ledger) in err


def test_a_last_ledger_line_cut_short_by_a_crash_is_ignored(data_files, tmp_path, capsys):
    layout, plan, train = submitted_run(data_files, tmp_path, "101")
    with layout.store.ledger_file.open("a") as log:
        log.write('{"job": "train/')
    from dpr_hpc.tracking.ledger import Ledger

    assert Ledger.read(layout.store).latest(train)["job_id"] == "101"


@pytest.mark.parametrize("damage", ["{not json", '{"grid": "g"}', '{"grid": "g", "cells": [{"group": 1}]}'])
def test_a_corrupt_plan_is_one_line_naming_it(data_files, tmp_path, capsys, damage):
    layout, _, _ = submitted_run(data_files, tmp_path, "101")
    (layout.root / "plan.json").write_text(damage)
    for command in ("status", "cancel", "collect"):
        code, _, err = run_cli(capsys, command, layout.root)
        assert code == 2 and _one_line(err) and str(layout.root / "plan.json") in err, command


def test_a_running_local_submit_is_named_by_the_second(data_files, cached_x_y, tmp_path, capsys):
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.locks import LockFile

    grid = write_grid(data_files, ONE_CELL_GRID)
    with LockFile(RunLayout(tmp_path / "runs" / "g").submit_lock, purpose="local submit"):
        code, _, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    last = err.splitlines()[-1]
    assert code == 2 and _one_line(last + "\n") and "another submit is running" in last and f"pid {os.getpid()}" in last


def test_a_submit_that_defers_jobs_exits_with_its_own_code(data_files, cached_x_y, tmp_path, monkeypatch, capsys):
    """The association allows one more job: train is queued, index and infer are deferred."""
    install_fake_slurm(tmp_path / "fake-slurm", monkeypatch, {"sbatch": 'echo "Submitted batch job 101"', "sacctmgr": "echo 1",
                                                              "scontrol": "exit 1", "squeue": "exit 0", "sacct": "exit 0"})
    grid = write_grid(data_files, ONE_CELL_GRID)
    code, out, _ = run_cli(capsys, "submit", grid, "--backend", "slurm", "--runs-root", tmp_path / "runs")
    assert code == EXIT_DEFERRED == 3
    assert "1 submitted" in out and "2 deferred" in out


def test_data_files_are_read_as_utf8_and_a_bad_byte_is_named_by_its_offset(tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    good.write_bytes(json.dumps([{"question": "café"}], ensure_ascii=False).encode())
    monkeypatch.setenv("LC_ALL", "C")
    assert next(iter_records(good))["question"] == "café"
    bad = tmp_path / "latin1.json"
    content = json.dumps([{"question": "x" * 3_000_000}]).encode()[:-3] + "é".encode("latin-1") + b'"}]'
    bad.write_bytes(content)
    with pytest.raises(DataFormatError, match=rf"latin1.json: not valid UTF-8 at byte {len(content) - 4}"):
        list(iter_records(bad))


def test_a_local_model_folder_without_dot_slash_is_taken_from_the_grids_folder(data_files, tmp_path, monkeypatch):
    (data_files / "models" / "bert").mkdir(parents=True)
    grid = write_grid(data_files, ONE_CELL_GRID.replace("encoder: x/y", "encoder: models/bert"))
    monkeypatch.chdir(tmp_path)  # a job's working directory is not the grid's folder
    cell = load_grid(grid).cells[0]
    assert cell.model_path(cell.question_encoder) == str(data_files / "models" / "bert")
    assert cell.hub_models == ()


def test_an_uncached_hub_model_offline_is_a_note_at_plan_and_an_error_at_submit(data_files, tmp_path, hub_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = write_grid(data_files, ONE_CELL_GRID.replace("encoder: x/y", "encoder: bert-base-uncassed"))
    code, _, err = run_cli(capsys, "plan", grid)
    assert code == 0 and "note: hub model bert-base-uncassed is not in the local Hugging Face cache" in err
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 2 and _one_line(err) and "hub model bert-base-uncassed is neither in the local Hugging Face cache" in err
    assert str(grid) in err and out == "" and not (tmp_path / "runs").exists()


def test_a_cached_hub_model_passes_offline(data_files, demo_assets, hub_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_hub_model(hub_cache, "org/cached-model", demo_assets / "models" / "tiny-bert")
    grid = write_grid(data_files, ONE_CELL_GRID.replace("encoder: x/y", "encoder: org/cached-model"))
    code, _, err = run_cli(capsys, "plan", grid)
    assert code == 0 and "hub model" not in err


def test_a_full_disk_while_submit_saves_the_plan_is_one_line_naming_the_file(data_files, cached_x_y, tmp_path, monkeypatch, capsys):
    """ENOSPC from fsync names no file; the user still reads which one, and no traceback."""
    import errno

    import dpr_hpc.fsutil as fsutil

    real_fsync = fsutil._fsync_file

    def disk_full_for_the_plan(path: Path) -> None:
        if path.name.startswith(".plan.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path)

    monkeypatch.setattr(fsutil, "_fsync_file", disk_full_for_the_plan)
    grid = write_grid(data_files, ONE_CELL_GRID)
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    plan_file = tmp_path / "runs" / "g" / "plan.json"
    assert code == 1 and _one_line(err), err
    assert f"{plan_file}: No space left on device" in err
    assert "running" not in out and not plan_file.exists()


def test_a_claim_lock_of_another_group_member_that_cannot_be_read_is_one_line_naming_it(data_files, tmp_path, monkeypatch, capsys):
    import errno

    from conftest import one_cell_run

    layout, _, train = one_cell_run(data_files, tmp_path)
    claim = layout.store.job(train).claim
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text("{}")
    real_read = Path.read_text

    def not_ours(path: Path, *args, **kwargs) -> str:
        if path.name == "claim.lock":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", not_ours)
    code, _, err = run_cli(capsys, "status", layout.root)
    assert code == 1 and _one_line(err), err
    assert f"{claim}: Permission denied" in err


def test_a_data_file_that_cannot_be_read_stops_submit_in_one_line_naming_it(data_files, cached_x_y, tmp_path, monkeypatch, capsys):
    """EIO is not "missing": the submit stops, naming the file and the error, and runs nothing."""
    import errno

    grid = write_grid(data_files, ONE_CELL_GRID)
    train = data_files / "train.json"
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path) == str(train):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(train))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 1 and _one_line(err), err
    assert f"{train}: Input/output error" in err and "running" not in out
