"""`make demo` and its grid, jobs/demo.yaml: what it plans, and its commands run as make runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, cli

DEMO_GROUPS = {"bert": 2, "distilbert": 2, "tinybert": 2, "electra": 2, "bert-gradcache": 1, "untrained-baseline": 1,
               "minilm": 1, "minilm-as-given": 1}


def demo_checkout(tmp_path: Path) -> Path:
    """jobs/demo.yaml where a checkout has it, with no data beside it yet (as before `make demo`)."""
    (tmp_path / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "demo.yaml", tmp_path / "jobs" / "demo.yaml")
    return tmp_path


def test_the_demo_grid_plans_twelve_cells_and_38_stage_jobs_reading_the_data_make_demo_generates(tmp_path):
    work = demo_checkout(tmp_path)
    done = cli("plan", "jobs/demo.yaml", "--json", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert plan["grid"] == "demo"
    assert Counter(cell["group"] for cell in plan["cells"]) == DEMO_GROUPS
    baseline = next(cell for cell in plan["cells"] if cell["group"] == "untrained-baseline")
    assert "train" not in baseline["keys"]  # evaluated untrained: no training job
    native = next(cell for cell in plan["cells"] if cell["group"] == "bert" and cell["embedding_size"] == 64)
    assert native["repeats"] == {"index": 3, "infer": 3}  # the cell repeated for median timings
    assert Counter(job["stage"] for job in plan["jobs"]) == {"train": 10, "index": 14, "infer": 14}
    assert not any(job["exists"] for job in plan["jobs"])
    # The grid reads what `make demo`'s first command, `dpr-hpc generate-demo data/demo`, writes.
    assert "generate-demo data/demo\n" in (REPO / "Makefile").read_text()
    demo = work / "data" / "demo"
    assert sorted(plan["missing_data"]) == sorted([str(demo / "dev.json"), str(demo / "train.json")] + [
        f"{demo / 'models' / name} (a local model folder)" for name in ("minilm", "tiny-bert", "tiny-distilbert", "tiny-electra", "tiny-tinybert")])


def make_demo_commands(venv: Path) -> list[list[str]]:
    """The commands `make demo` runs after installing, as dpr-hpc arguments (make -n prints them)."""
    venv.mkdir()
    (venv / ".installed").touch()  # installed: make prints only the demo's own commands
    printed = subprocess.run(["make", "-n", "-C", str(REPO), "demo", f"VENV={venv}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[1:] for line in printed.splitlines() if line.startswith(f"{venv}/bin/dpr-hpc ")]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_demo_generates_the_data_submits_collects_and_reports(tmp_path):
    """`make demo`'s four commands, in a fresh folder. The full grid trains nine tiny encoders,
    far more than a few minutes on a CI runner's CPUs, so its submit runs one cell (the
    untrained baseline); collect and report then show that cell among the twelve."""
    commands = make_demo_commands(tmp_path / "venv")
    assert [c[0] for c in commands] == ["generate-demo", "submit", "collect", "report"]
    assert commands[1] == ["submit", "jobs/demo.yaml", "--backend", "local"]
    work = demo_checkout(tmp_path / "checkout")
    for command in commands:
        if command[0] == "submit":
            command = [*command, "--group", "untrained-baseline"]
        done = cli(*command, cwd=work)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        if command[0] == "submit":
            assert "grid demo: 12 cells, 38 stage jobs (2 selected" in done.stdout
            assert "2 ran, 0 already complete" in done.stdout
    median = (work / "results" / "demo-median.csv").read_text().splitlines()
    assert len(median) == 1 + 12
    baseline = next(line for line in median if "-eval-" in line)
    assert "untrained-baseline" in baseline
    assert (work / "results" / "demo" / "report.md").is_file() and (work / "results" / "demo" / "report.html").is_file()
