"""Issue 11's sweep, run for real on the local backend: one training and one index shared by
every ef_search, only new searches when a value is added, and an edited dev file reruns exactly
the stages that read it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_grid

pytestmark = pytest.mark.slow

SWEEP = """
    name: sweep
    data: {{train: {demo}/train.json, dev: {dev}}}
    defaults:
      train: {{epochs: 2, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: 5, batch_size: 32}}
      text: {{max_length: 64}}
      encode_batch_size: 128
    blocks:
      - name: m64
        encoder: {demo}/models/tiny-bert
        index: {{hnsw_m: 64}}
        cells: [{cells}]
      - name: m512
        encoder: {demo}/models/tiny-bert
        index: {{hnsw_m: 512}}
        cells: [{cells}]
"""


def cells(ef_searches: list[int]) -> str:
    return ", ".join(f"{{embedding_size: 64, index: {{ef_search: {ef}}}}}" for ef in ef_searches)


def submit(grid: Path, work: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dpr_hpc", "submit", str(grid), "--backend", "local"],
                          capture_output=True, text=True, cwd=work, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def ran(stdout: str) -> list[str]:
    """The stage of every job a local submit ran ('[ 3/9] infer r0 ...  done in ...')."""
    return [line.split("]")[1].split()[0] for line in stdout.splitlines() if "  done in " in line]


def test_a_sweep_shares_training_and_index_and_an_edited_dev_file_reruns_what_read_it(demo_assets, tmp_path):
    dev = tmp_path / "dev.json"
    shutil.copy(demo_assets / "dev.json", dev)
    grid = write_grid(tmp_path, SWEEP.format(demo=demo_assets, dev=dev, cells=cells([32, 128, 256])), "sweep.yaml")
    first = ran(submit(grid, tmp_path))
    assert sorted(first) == ["index"] * 2 + ["infer"] * 6 + ["train"]

    grid.write_text(grid.read_text().replace(cells([32, 128, 256]), cells([32, 128, 256, 512])))
    assert ran(submit(grid, tmp_path)) == ["infer", "infer"]

    records = json.loads(dev.read_text())
    records[0]["positive_ctxs"][0]["text"] += " (edited)"
    dev.write_text(json.dumps(records))
    status = subprocess.run([sys.executable, "-m", "dpr_hpc", "status", str(grid), "--json"], capture_output=True, text=True, cwd=tmp_path)
    rows = json.loads(status.stdout)[0]["rows"]
    assert {r["stage"]: r["state"] for r in rows if r["stage"] == "train"} == {"train": "COMPLETED"}
    assert {r["state"] for r in rows if r["stage"] != "train"} == {"STALE"}
    assert all("dev_data" in r["detail"] for r in rows if r["stage"] != "train")
    collect = subprocess.run([sys.executable, "-m", "dpr_hpc", "collect", str(grid), "--out", str(tmp_path / "results")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert collect.returncode == 0 and "left out of the table" in collect.stderr
    again = submit(grid, tmp_path)
    assert sorted(ran(again)) == ["index"] * 2 + ["infer"] * 8
    assert again.count("rerun: it replaces the record of key") == 10
