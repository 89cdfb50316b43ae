"""`make clean` removes build output and the demo, never a real run's results."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_clean_keeps_real_runs_and_says_how_to_delete_them(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    kept = ["runs/paper/ledger.json", "data/nq/biencoder-nq-dev.json", "results/paper-median.csv", "jobs/paper.yaml"]
    removed = ["runs/demo/ledger.json", "data/demo/dev.json", "build/lib/x.py", "dpr_hpc.egg-info/PKG-INFO",
               "results/demo-median.csv", "results/demo.md", "dpr_hpc/__pycache__/cli.pyc"]
    for name in kept + removed:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    done = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert [name for name in kept if not (tmp_path / name).exists()] == []
    assert [name for name in removed if (tmp_path / name).exists()] == []
    assert "rm -rf runs/<grid name>" in done.stdout
