"""Stage jobs run for real, in this process, through the runner: what a crash or a rerun
leaves in an attempt is recovered, never thrown away and never trusted blindly."""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import run_folder, train_folder
from dpr_hpc.planning.plan import StageJob
from dpr_hpc.store.records import request_rerun
from dpr_hpc.store.bindings import load_plan
from dpr_hpc.stages.runner import run_stage_job

pytestmark = pytest.mark.slow

ONE_EPOCH = "    train: {epochs: 1}\n"


def test_a_training_whose_record_json_was_written_but_not_result_json_is_promoted_not_rerun(demo_assets, tmp_path, monkeypatch):
    """A quota error (or SIGKILL, or a lost node) between attempts/a1/record.json and
    result.json: the next run of the job finds attempt 1 complete and makes it the record,
    rather than training again from step 0 as attempt 2."""
    import dpr_hpc.store.records as results

    layout, cell_id = run_folder(tmp_path, demo_assets, "promote", extra=ONE_EPOCH)
    key = load_plan(layout).keys[cell_id]["train"]
    folder = train_folder(layout, cell_id)
    real_write = results.write_json_atomic

    def quota_on_result(path, payload):
        if path == folder.result:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
        real_write(path, payload)

    monkeypatch.setattr(results, "write_json_atomic", quota_on_result)
    with pytest.raises(OSError, match="quota"):
        run_stage_job(str(layout.runs_root), "train", key, 0)
    assert folder.attempt(1).record.is_file() and not folder.result.exists()
    monkeypatch.setattr(results, "write_json_atomic", real_write)

    run_stage_job(str(layout.runs_root), "train", key, 0)
    assert folder.attempt_numbers() == [1]  # no second training
    assert folder.result.read_bytes() == folder.attempt(1).record.read_bytes()


def test_an_index_continued_after_its_training_was_rerun_encodes_its_old_shards_again(demo_assets, tmp_path, monkeypatch):
    """The index job fails after writing its shards; the training is rerun under the same key
    (submit --force; on a GPU its weights differ); the index job, continued in the same attempt,
    encodes every passage again rather than keep vectors of the old passage encoder."""
    import dpr_hpc.stages.index as index_stage

    layout, cell_id = run_folder(tmp_path, demo_assets, "reshard", extra=ONE_EPOCH)
    keys = load_plan(layout).keys[cell_id]
    runs_root = str(layout.runs_root)
    run_stage_job(runs_root, "train", keys["train"], 0)
    real_build = index_stage.build_index_from_file

    def node_lost(*args, **kwargs):
        raise RuntimeError("node lost while building the index")

    monkeypatch.setattr(index_stage, "build_index_from_file", node_lost)
    with pytest.raises(RuntimeError, match="node lost"):
        run_stage_job(runs_root, "index", keys["index"], 0)
    index_folder = layout.store.job(StageJob("index", keys["index"], 0))
    shards = sorted(index_folder.attempt(1).shards.glob("shard-*.json"))
    assert shards, "the failed index job wrote no shard"
    monkeypatch.setattr(index_stage, "build_index_from_file", real_build)

    trained = train_folder(layout, cell_id)
    request_rerun(trained, 1)  # what submit --force --stage train does
    run_stage_job(runs_root, "train", keys["train"], 0)
    assert json.loads(trained.result.read_text())["attempt"] == 2

    run_stage_job(runs_root, "index", keys["index"], 0)
    record = json.loads(index_folder.result.read_text())
    assert record["attempt"] == 1  # continued in the attempt that failed
    assert record["details"]["reused_shards"] == 0
    assert record["upstream"] == {f"train/{keys['train']}/r0": results_digest(trained.result)}


def results_digest(path) -> str:
    from dpr_hpc.inputs.content import sha256_bytes

    return sha256_bytes(path.read_bytes())
