"""submit --force and logs on a grid run for real by the local backend (tiny BERT, demo data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, submitted_locally

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ran(demo_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("force")
    grid = submitted_locally(work, demo_assets, epochs=2, warmup_steps=2)
    rows = json.loads(cli("status", grid, "--json", cwd=work).stdout)[0]["rows"]
    trained = next(r["cell_id"] for r in rows if r["stage"] == "train")
    return work, grid, trained


def attempts(work: Path, grid: Path) -> dict[tuple[str, str, int], tuple[str, int]]:
    rows = json.loads(cli("status", grid, "--json", cwd=work).stdout)[0]["rows"]
    return {(r["cell_id"], r["stage"], r["repeat"]): (r["state"], r["attempt"]) for r in rows}


def test_logs_prints_the_training_log(ran):
    work, grid, trained = ran
    done = cli("logs", trained, "--stage", "train", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "(attempt 1) <==" in done.stdout and "epoch 1/2  loss" in done.stdout and "epoch 2/2  loss" in done.stdout


def test_force_reruns_the_index_repeats_of_one_cell_only_and_keeps_the_old_attempt(ran):
    work, grid, trained = ran
    before = attempts(work, grid)
    forced = cli("submit", grid, "--backend", "local", "--force", "--stage", "index", "--cell", trained, cwd=work)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "local: 2 ran, 0 already complete (skipped), 0 failed, 0 blocked" in forced.stdout
    assert "are STALE now" in forced.stdout
    after = attempts(work, grid)
    for (cell, stage, repeat), (state, attempt) in after.items():
        if (cell, stage) == (trained, "index"):
            assert (state, attempt) == ("COMPLETED", 2)
        elif (cell, stage) == (trained, "infer"):
            assert state == "STALE" and attempt == 1  # it read the index attempt 1, now replaced
        else:
            assert (state, attempt) == before[(cell, stage, repeat)]
    replaced = list(work.glob("runs/store/index/*/r*/attempts/a2"))
    assert len(replaced) == 2
    for new in replaced:
        old = new.parent / "a1"
        kept = json.loads((old / "record.json").read_text())["artifacts"]
        assert kept and all((old / name).is_file() for name in kept)  # every output of attempt 1 still there
    shown = cli("logs", trained, "--stage", "index", "--repeat", "1", cwd=work)
    assert "(attempt 2) <==" in shown.stdout and "(attempt 1)" not in shown.stdout
    again = cli("submit", grid, "--backend", "local", "--stage", "infer", "--cell", trained, cwd=work)
    assert again.returncode == 0 and "local: 3 ran" in again.stdout, again.stdout
