"""Completion is decided by validated records; markers tell FAILED, RUNNING and INTERRUPTED apart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.layout import RunLayout
from dpr_hpc.plan import StageJob, make_plan
from dpr_hpc.provenance import node_tags, now_iso
from dpr_hpc.results import is_complete, make_record, write_record
from dpr_hpc.runstate import save_plan
from dpr_hpc.status import stage_states


@pytest.fixture
def run(data_files, tmp_path):
    path = write_grid(data_files, """
        name: g
        data: {train: train.json, dev: dev.json}
        blocks:
          - {name: b, encoder: bert-base-uncased, embedding_sizes: [64], repeats: {index: 2}}
    """)
    plan = make_plan(load_grid(path))
    layout = RunLayout(tmp_path / "run")
    save_plan(layout, plan, path)
    return layout, plan, plan.cells[0]


def complete(layout, cell, job, **overrides):
    record = make_record(cell, job, metrics={"epoch_loss": [1.0], "num_passages": 1, "num_questions": 1},
                         timings={"ttt_s": 1.0, "encode_s": 1, "index_build_s": 1, "pei_s": 2, "ita_mean_ms": 1, "ita_sd_ms": 0},
                         node=node_tags(), started_at=now_iso(), finished_at=now_iso())
    record.update(overrides)
    write_record(layout.stage(job).result, record)


def states_by_key(layout, plan):
    return {s.job.key.split("/", 1)[1]: s.state for s in stage_states(layout, plan).states}


def test_nothing_run_is_pending(run):
    layout, plan, _ = run
    assert set(states_by_key(layout, plan).values()) == {"PENDING"}


def test_valid_record_completes_and_tampered_ones_do_not(run):
    layout, plan, cell = run
    train = StageJob(cell.cell_id, "train", 0)
    complete(layout, cell, train)
    assert is_complete(layout.stage(train).result, cell, train)
    complete(layout, cell, train, config_hash="0" * 64)
    assert not is_complete(layout.stage(train).result, cell, train)
    complete(layout, cell, train, artifacts=["checkpoint/question_encoder/dpr_encoder.json"])
    assert not is_complete(layout.stage(train).result, cell, train)
    layout.stage(train).result.write_text('{"schema": 1, "cell_id"')  # truncated
    assert not is_complete(layout.stage(train).result, cell, train)
    assert states_by_key(layout, plan)["train/r0"] == "PENDING"


def test_failed_stage_blocks_its_dependants(run):
    layout, plan, cell = run
    failed = layout.stage(StageJob(cell.cell_id, "train", 0)).failure
    failed.parent.mkdir(parents=True)
    failed.write_text(json.dumps({"error": "ValueError: boom", "host": "n1"}))
    assert states_by_key(layout, plan) == {"train/r0": "FAILED", "index/r0": "BLOCKED", "index/r1": "BLOCKED", "infer/r0": "BLOCKED"}


def test_running_marker_of_a_dead_process_reads_interrupted(run):
    layout, plan, cell = run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = layout.stage(StageJob(cell.cell_id, "train", 0)).running
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert states_by_key(layout, plan)["train/r0"] == "INTERRUPTED"
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert states_by_key(layout, plan)["train/r0"] == "RUNNING"


@pytest.mark.parametrize("listed, expected", [("3,5", {"gpus_per_node": 1, "visible_gpus": (3,)}), ("", {"gpus_per_node": 0, "visible_gpus": ()})])
def test_local_jobs_get_one_of_the_visible_gpus(run, monkeypatch, listed, expected):
    from dpr_hpc.backends.local import LocalBackend

    layout, plan, _ = run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    params = LocalBackend(layout, plan).executor_parameters()
    assert {k: params[k] for k in expected} == expected


def test_collect_flags_a_median_over_repeats_that_ran_in_different_precisions_or_gpus(run):
    from dpr_hpc.collect import collect_table

    layout, plan, cell = run
    complete(layout, cell, StageJob(cell.cell_id, "train", 0))
    complete(layout, cell, StageJob(cell.cell_id, "infer", 0), details={"precision": "fp32"})
    complete(layout, cell, StageJob(cell.cell_id, "index", 0), details={"precision": "fp32"})
    complete(layout, cell, StageJob(cell.cell_id, "index", 1), details={"precision": "fp32"})
    table = collect_table(layout, plan, median=True)
    assert table["mixed"].isna().all()  # index twice, infer once: nothing mixed
    assert list(collect_table(layout, plan)["precision"]) == ["fp32/fp32", "fp32/-"]

    node = {**node_tags(), "gpu_name": "Tesla V100"}
    complete(layout, cell, StageJob(cell.cell_id, "index", 1), details={"precision": "fp16"}, node=node)
    mixed = collect_table(layout, plan, median=True)["mixed"].iloc[0]
    assert "index precision: fp16, fp32" in mixed and "index gpu:" in mixed and "Tesla V100" in mixed
    assert "infer" not in mixed
