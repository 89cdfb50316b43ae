"""One writer per stage job: two copies started at once, exactly one runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import run_folder, train_folder
from dpr_hpc.plan import StageJob
from dpr_hpc.runstate import load_plan
from dpr_hpc.stages.runner import EXIT_CLAIMED

RUN_ONE = "import sys; from dpr_hpc.stages.runner import run_stage_job; run_stage_job(sys.argv[1], 'train', sys.argv[2], 0)"


@pytest.mark.slow
def test_two_copies_of_a_stage_job_one_runs_and_the_other_exits_naming_it(demo_assets, tmp_path):
    layout, cell_id = run_folder(tmp_path, demo_assets, "twice", extra="    train: {epochs: 20}\n")
    key = load_plan(layout).keys[cell_id]["train"]
    folder = train_folder(layout, cell_id)
    command = [sys.executable, "-c", RUN_ONE, str(layout.runs_root), key]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not folder.claim.exists():  # wait on the state, not on a sleep
        assert first.poll() is None and time.monotonic() < deadline, "the first copy never claimed the job"
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert second.returncode == EXIT_CLAIMED, second.stderr
    assert f"held by pid {first.pid}" in second.stderr and "exits without writing anything" in second.stderr
    assert "Traceback" not in second.stderr
    record = json.loads(folder.result.read_text())
    assert record["attempt"] == 1 and folder.attempt_numbers() == [1]  # the second copy made no attempt
    assert not folder.claim.exists()
    assert record["key"] == StageJob("train", key, 0).key
