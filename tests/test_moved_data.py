"""A finished grid whose data folder moves (scratch to project space) and whose grid file is
edited to the new paths: keys and records name inputs by content, so nothing reads as stale
and nothing runs again. Run for real by the local backend, as `make demo` runs the demo."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli, write_grid

pytestmark = pytest.mark.slow

# jobs/demo.yaml's shape, small: the data and models lie beside the grid's folder, named by
# relative paths; a trained cell and the same weights evaluated untrained.
SMALL_DEMO = """
    name: small-demo
    data: {train: ../data/demo/train.json, dev: ../data/demo/dev.json}
    defaults:
      train: {epochs: 1, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: 2, seed: 7, batch_size: 32}
      text: {max_length: 64}
      encode_batch_size: 128
    blocks:
      - name: bert
        encoder: ../data/demo/models/tiny-bert
        embedding_sizes: [64]
      - name: untrained-baseline
        encoder: ../data/demo/models/tiny-bert
        evaluate_only: true
        embedding_sizes: [64]
"""


def test_moving_a_finished_demos_data_folder_and_editing_the_grid_keeps_every_job_completed_and_submit_starts_nothing(demo_assets, tmp_path):
    shutil.copytree(demo_assets, tmp_path / "data" / "demo")
    (tmp_path / "jobs").mkdir()
    grid = write_grid(tmp_path / "jobs", SMALL_DEMO, "small-demo.yaml")
    first = cli("submit", grid, "--backend", "local", cwd=tmp_path)
    assert first.returncode == 0 and "local: 5 ran" in first.stdout, first.stdout + first.stderr
    attempts = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs" / "store").glob("*/*/r*/attempts/a*"))

    (tmp_path / "project").mkdir()
    shutil.move(tmp_path / "data" / "demo", tmp_path / "project" / "demo")  # off scratch: the old path is gone
    grid.write_text(grid.read_text().replace("../data/demo/", "../project/demo/"))

    status = cli("status", grid, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)[0]["rows"]
    assert len(rows) == 5 and {row["state"] for row in rows} == {"COMPLETED"}, [(r["stage"], r["state"], r["detail"]) for r in rows]
    again = cli("submit", grid, "--backend", "local", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "local: 0 ran, 5 already complete (skipped)" in again.stdout
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs" / "store").glob("*/*/r*/attempts/a*")) == attempts
    # A job that runs now reads its upstream records through its spec, which names the new paths.
    forced = cli("submit", grid, "--backend", "local", "--force", "--stage", "infer", cwd=tmp_path)
    assert forced.returncode == 0 and "local: 2 ran, 0 already complete (skipped), 0 failed" in forced.stdout, forced.stdout + forced.stderr
