"""Hub models for compute nodes without internet: `prefetch` puts every hub model a grid names
into the Hugging Face cache and records its commit in the run folder; `submit` refuses a model
neither cached nor reachable; stage jobs run offline and load the commit their key names.

The hub cannot be reached here: a fake cache (conftest.cache_hub_model) stands for a download,
and HF_ENDPOINT points at a closed local port, so "the network is off" whatever the machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FAKE_COMMIT, cache_hub_model, run_cli, write_grid
from fake_slurm import install as install_fake_slurm
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.inputs import hub

OTHER_COMMIT = "f" * 40


@pytest.fixture
def network_off(monkeypatch):
    """The hub unreachable (nothing listens on port 9) but not declared offline."""
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def hub_grid(folder: Path, demo: Path) -> Path:
    """One evaluation-only cell of the "hub" model bert-base-uncased: an index and a search."""
    return write_grid(folder, f"""
        name: hubgrid
        data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
        defaults: {{text: {{max_length: 64}}, encode_batch_size: 128, index: {{type: flat}}}}
        blocks:
          - {{name: hub, encoder: bert-base-uncased, evaluate_only: true, embedding_sizes: [64]}}
    """)


def test_with_the_model_cached_prefetch_records_its_commit_and_the_grid_runs_offline(hub_cache, demo_assets, network_off, tmp_path, capsys):
    cache_hub_model(hub_cache, "bert-base-uncased", demo_assets / "models" / "tiny-bert")
    grid, runs = hub_grid(tmp_path, demo_assets), tmp_path / "runs"

    code, out, _ = run_cli(capsys, "prefetch", grid, "--runs-root", runs)
    assert code == 0 and f"bert-base-uncased  {FAKE_COMMIT}" in out and "fetched" not in out  # cached: nothing to fetch
    assert json.loads((runs / "store" / "hub-pins.json").read_text())["models"] == {"bert-base-uncased": FAKE_COMMIT}
    code, out, _ = run_cli(capsys, "prefetch", grid, "--update", "--runs-root", runs)
    assert code == 0 and f"bert-base-uncased: kept commit {FAKE_COMMIT}; not fetched from the hub" in out
    recorded = json.loads(RunLayout.for_grid("hubgrid", runs).hub_models.read_text())
    assert recorded["models"] == {"bert-base-uncased": FAKE_COMMIT} and recorded["hub_cache"] == str(hub_cache.resolve())

    code, out, _ = run_cli(capsys, "submit", grid, "--dry-run", "--runs-root", runs)
    assert code == 0
    assert "export HF_HUB_OFFLINE=1\nexport TRANSFORMERS_OFFLINE=1\n" in out and f"export HF_HUB_CACHE={hub_cache.resolve()}\n" in out

    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", runs)
    assert code == 0 and "2 ran" in out, out + err
    specs = [json.loads(p.read_text()) for p in (runs / "store").glob("*/*/spec.json")]
    assert [s["hub_revisions"] for s in specs] == [{"bert-base-uncased": FAKE_COMMIT}] * 2


def test_without_the_model_and_with_the_network_off_submit_and_prefetch_exit_2_naming_it(hub_cache, demo_assets, network_off, tmp_path, monkeypatch, capsys):
    # SLURM's commands are there (a fresh machine has none; the model check must come first
    # all the same), and each one notes that it was called: nothing may reach the scheduler.
    called = install_fake_slurm(tmp_path / "fake-slurm", monkeypatch, {
        name: f'echo "$@" >> "$FAKE_SLURM/{name}.called"; exit 1' for name in ("sbatch", "sacct", "squeue", "sacctmgr", "scontrol", "srun")})
    grid, runs = hub_grid(tmp_path, demo_assets), tmp_path / "runs"
    for command in (["submit", grid, "--backend", "local"], ["submit", grid, "--backend", "slurm"], ["prefetch", grid]):
        code, out, err = run_cli(capsys, *command, "--runs-root", runs)
        assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, command
        assert err.startswith(f"dpr-hpc: error: {grid}: block hub: encoder: hub model bert-base-uncased is neither in the local Hugging Face cache")
        assert "nor reachable" in err and "ConnectError" in err
    assert not (runs / "store").exists() and not list(called.glob("*.called"))


def test_declared_offline_the_reason_says_so(hub_cache, demo_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "submit", hub_grid(tmp_path, demo_assets), "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 2 and "nor reachable: the hub is offline here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" in err


LISTING = ["config.json", "vocab.txt", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin",
           "tf_model.h5", "flax_model.msgpack", "onnx/model.onnx", "onnx/config.json", "README.md"]


@pytest.fixture
def fake_hub(hub_cache, demo_assets, monkeypatch):
    """The hub client stood in for: the listing it returns, and a download that leaves the
    cache as huggingface_hub does (refs/main naming the commit main resolved to, a pinned
    commit's files under snapshots/ with refs untouched). Its `main` is the hub's main now."""
    import shutil

    import huggingface_hub

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    state = SimpleNamespace(main=OTHER_COMMIT, fetched=[])

    def download(model, revision, cache_dir, allow_patterns, **_):
        state.fetched.append({"model": model, "revision": revision, "files": allow_patterns})
        repo = Path(cache_dir) / f"models--{model.replace('/', '--')}"
        commit = state.main if revision == "main" else revision
        if revision == "main":
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(commit)
        if not (repo / "snapshots" / commit).is_dir():
            shutil.copytree(demo_assets / "models" / "tiny-bert", repo / "snapshots" / commit)
        return str(repo / "snapshots" / commit)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, model, revision, timeout: SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in LISTING]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return state


def test_prefetch_downloads_one_weight_format_and_records_the_commit_main_resolved_to(fake_hub, demo_assets, tmp_path, capsys):
    grid, runs = hub_grid(tmp_path, demo_assets), tmp_path / "runs"
    code, out, _ = run_cli(capsys, "prefetch", grid, "--runs-root", runs)
    assert code == 0 and f"bert-base-uncased: fetched commit {OTHER_COMMIT}" in out
    assert fake_hub.fetched == [{"model": "bert-base-uncased", "revision": "main",
                                 "files": ["config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]}]
    assert json.loads(RunLayout.for_grid("hubgrid", runs).hub_models.read_text())["models"] == {"bert-base-uncased": OTHER_COMMIT}
    assert hub.files_to_fetch(["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "tf_model.h5"]) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]


def plan_keys(capsys, grid: Path, runs: Path) -> dict:
    code, out, err = run_cli(capsys, "plan", grid, "--runs-root", runs, "--json")
    assert code == 0, err
    return {cell["cell_id"]: cell["keys"] for cell in json.loads(out)["cells"]}


def test_a_pin_holds_when_another_download_moves_the_caches_main_and_moves_only_with_update(hub_cache, fake_hub, demo_assets, tmp_path, capsys):
    """The Hugging Face cache is shared by every grid: a download for another grid (another
    runs root here) moves its refs/main. This runs root's keys, and the commit its jobs load,
    stay on the pin until `prefetch --update` moves it, saying so."""
    cache_hub_model(hub_cache, "bert-base-uncased", demo_assets / "models" / "tiny-bert")
    grid, runs = hub_grid(tmp_path, demo_assets), tmp_path / "runs"
    assert run_cli(capsys, "prefetch", grid, "--runs-root", runs)[0] == 0
    before = plan_keys(capsys, grid, runs)

    code, out, _ = run_cli(capsys, "prefetch", grid, "--update", "--runs-root", tmp_path / "other-runs")
    assert code == 0 and f"fetched commit {OTHER_COMMIT}" in out and hub.cached_revision("bert-base-uncased") == OTHER_COMMIT
    assert plan_keys(capsys, grid, runs) == before
    assert json.loads((runs / "store" / "hub-pins.json").read_text())["models"] == {"bert-base-uncased": FAKE_COMMIT}
    code, out, _ = run_cli(capsys, "submit", grid, "--dry-run", "--runs-root", runs)
    assert code == 0 and not [f for f in fake_hub.fetched if f["revision"] != "main"]

    code, out, _ = run_cli(capsys, "prefetch", grid, "--update", "--runs-root", runs)
    assert code == 0 and f"bert-base-uncased: pin moved from {FAKE_COMMIT} to {OTHER_COMMIT}" in out and "run again" in out
    assert plan_keys(capsys, grid, runs) != before
    assert json.loads(RunLayout.for_grid("hubgrid", runs).hub_models.read_text())["models"] == {"bert-base-uncased": OTHER_COMMIT}


def test_a_pinned_commit_gone_from_the_cache_is_fetched_again_at_that_commit_or_named_when_out_of_reach(
        hub_cache, fake_hub, demo_assets, tmp_path, monkeypatch, capsys):
    import shutil

    cache_hub_model(hub_cache, "bert-base-uncased", demo_assets / "models" / "tiny-bert")
    grid, runs = hub_grid(tmp_path, demo_assets), tmp_path / "runs"
    assert run_cli(capsys, "prefetch", grid, "--runs-root", runs)[0] == 0
    shutil.rmtree(hub_cache)  # a cleaned cache, or another HF_HOME

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", runs)
    assert code == 2 and f"hub model bert-base-uncased at its pinned commit {FAKE_COMMIT} ({runs / 'store' / 'hub-pins.json'})" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code, out, _ = run_cli(capsys, "prefetch", grid, "--runs-root", runs)
    assert code == 0 and fake_hub.fetched[-1]["revision"] == FAKE_COMMIT and f"fetched commit {FAKE_COMMIT}" in out
    assert hub.has_snapshot("bert-base-uncased", FAKE_COMMIT) and "pin moved" not in out


def test_a_job_loads_the_commit_its_spec_names_even_when_the_cache_has_moved_on(hub_cache, demo_assets, tmp_path, monkeypatch):
    """refs/main moves to a commit whose files are not here after the plan: the job, offline
    in its own process as on a node, still loads the commit its key was made with (a load of
    main would fail)."""
    import subprocess
    import sys

    from dpr_hpc.grid import load_grid
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.bindings import save_plan

    repo = cache_hub_model(hub_cache, "bert-base-uncased", demo_assets / "models" / "tiny-bert")
    grid = hub_grid(tmp_path, demo_assets)
    layout = RunLayout.for_grid("hubgrid", tmp_path / "runs")
    plan = make_plan(load_grid(grid))
    save_plan(layout, plan, grid)
    (repo / "refs" / "main").write_text(OTHER_COMMIT)
    index = next(job for job in plan.jobs() if job.stage == "index")
    job = f"from dpr_hpc.stages.runner import run_stage_job; run_stage_job({str(layout.runs_root)!r}, 'index', {index.key!r}, 0)"
    done = subprocess.run([sys.executable, "-c", job], env={**os.environ, **hub.job_environment()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert layout.store.job(index).result.is_file()


def test_local_jobs_start_with_the_hub_offline_and_the_submitter_keeps_its_environment(cached_x_y, data_files, tmp_path, monkeypatch):
    import submitit

    import dpr_hpc
    from conftest import ONE_CELL_GRID

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    grid = write_grid(data_files, ONE_CELL_GRID)
    seen: dict[str, str] = {}

    class Started(Exception):
        pass

    def start(self, *args):
        seen.update(os.environ)
        raise Started

    monkeypatch.setattr(submitit.LocalExecutor, "submit", start)
    with pytest.raises(Started):
        dpr_hpc.submit(grid, backend="local", runs_root=tmp_path / "runs")
    assert {k: seen.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert seen["HF_HUB_CACHE"] == str(hub.hub_cache_dir().resolve()) and "HF_HUB_OFFLINE" not in os.environ
