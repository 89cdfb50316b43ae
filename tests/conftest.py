from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from dpr_hpc.cli.main import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def checked_weights_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test starts with no checkpoint remembered as checked (dpr_hpc.modeling.checked_weights),
    in a folder apart from its tmp_path, and never reads or fills the user's own."""
    folder = tmp_path_factory.mktemp("dpr-hpc-cache")
    monkeypatch.setenv("DPR_HPC_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def slurm_cluster_session():
    """The test SLURM cluster (tests/slurm/cluster-up.sh, $DPR_HPC_TEST_NODES nodes, default 1),
    once for the whole run, with its SLURM_CONF in the environment of every command the tests
    start. Skips where it cannot come up, or fails under DPR_HPC_REQUIRE_SLURM=1 (CI). A cluster
    this session started is stopped at its end; one it found (started earlier by cluster-up.sh) is
    left running."""
    import slurmtools

    cluster = slurmtools.bring_up(slurmtools.wanted_nodes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", cluster.conf)
        yield cluster
        cluster.clean_up()
    if cluster.started_here:
        slurmtools.bring_down()


@pytest.fixture
def slurm_cluster(slurm_cluster_session):
    """What every test that needs SLURM's commands or daemons requests: the session's cluster,
    left with no job queued, held or running, and every node in service, whether the test passed
    or failed."""
    yield slurm_cluster_session
    slurm_cluster_session.clean_up()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """The offline demo's data and tiny models, generated once for the whole session."""
    from dpr_hpc.demo.generate import generate_demo
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out)
    return out


# A commit id as the hub writes them (40 hex digits): transformers loads a pinned revision only
# in that form without asking the hub.
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache of this test's own (HF_HUB_CACHE), which the jobs and
    subprocesses it starts inherit."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def cache_hub_model(cache: Path, model: str, files: Path, commit: str = FAKE_COMMIT) -> Path:
    """`model` in the hub cache's layout (refs/main naming `commit`, snapshots/<commit>/ holding
    a real tiny model's files), as huggingface_hub leaves a download: the hub cannot be reached
    here, so this is how tests have a "hub" model."""
    import shutil

    repo = cache / f"models--{model.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
    return repo


@pytest.fixture
def cached_x_y(hub_cache, demo_assets) -> Path:
    """The hub model x/y, which the small test grids name, in this test's hub cache (a submit
    refuses a model neither cached nor reachable, and the hub is not reachable here)."""
    return cache_hub_model(hub_cache, "x/y", demo_assets / "models" / "tiny-bert")


@pytest.fixture
def data_files(tmp_path) -> Path:
    """Two tiny files in DPR's format, enough for grids that are loaded but not run."""
    record = {"question": "q?", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "a", "passage_id": "1"}]}
    for name in ("train.json", "dev.json"):
        (tmp_path / name).write_text(json.dumps([record]))
    return tmp_path


def trained_and_untrained_grid(folder: Path, demo: Path, epochs: int, warmup_steps: int) -> Path:
    """One trained tiny BERT (the demo's settings) with repeated timing stages, and the same
    weights evaluated untrained: the grid the end-to-end tests run."""
    return write_grid(folder, f"""
        name: e2e
        data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
        defaults:
          train: {{epochs: {epochs}, learning_rate: 1.0e-3, dropout: 0.0, warmup_steps: {warmup_steps}, seed: 7, batch_size: 16}}
          text: {{max_length: 64}}
          encode_batch_size: 128
        blocks:
          - name: trained
            encoder: {demo}/models/tiny-bert
            cells: [{{embedding_size: 64, repeats: {{index: 2, infer: 3}}}}]
          - name: untrained
            encoder: {demo}/models/tiny-bert
            evaluate_only: true
            embedding_sizes: [64]
    """)


def cli(*args, cwd: Path) -> "subprocess.CompletedProcess":
    """dpr-hpc in its own process, as a user runs it (stage jobs inherit PYTHONPATH)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dpr_hpc", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def submitted_locally(work: Path, demo: Path, epochs: int, warmup_steps: int) -> Path:
    """trained_and_untrained_grid, run to completion by the local backend; the grid file."""
    grid = trained_and_untrained_grid(work, demo, epochs=epochs, warmup_steps=warmup_steps)
    done = cli("submit", grid, "--backend", "local", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    return grid


def write_grid(folder: Path, text: str, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


ONE_CELL_GRID = "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n"


def one_cell_run(data_files: Path, tmp_path: Path):
    """A one-cell run folder with its plan saved and nothing submitted (so no backend asks SLURM)."""
    from dpr_hpc.grid import load_grid
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.bindings import save_plan

    grid = write_grid(data_files, ONE_CELL_GRID)
    plan = make_plan(load_grid(grid))
    layout = RunLayout(tmp_path / "runs" / "g")
    save_plan(layout, plan, grid)
    return layout, plan, next(plan.jobs())


def submitted_run(data_files: Path, tmp_path: Path, train_job_id: str):
    """A one-cell run folder whose train job the ledger says was submitted as `train_job_id`."""
    from dpr_hpc.tracking.ledger import Ledger

    layout, plan, train = one_cell_run(data_files, tmp_path)
    with Ledger.locked(layout.store) as ledger:
        ledger.record(train, train_job_id)
    return layout, plan, train


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 384 demo questions at batch 16: 24 steps an epoch, 72 in all; dropout on so that resuming has
# to restore the RNG to draw the same masks.
GRID = """\
    name: {name}
    data: {{train: {demo}/train.json, dev: {demo}/dev.json}}
    defaults:
      train: {{epochs: 3, batch_size: 16, learning_rate: 0.001, warmup_steps: 5, dropout: 0.1}}
      text: {{max_length: 64}}
      index: {{type: flat}}
      checkpoint: {{every_steps: {every}}}
    blocks:
      - name: resume
        encoder: {demo}/models/tiny-bert
        embedding_sizes: [48]
"""


class StopAfter:
    """Asks the training to stop once it has taken `steps` more steps (as a signal would)."""

    reason = "test stop"

    def __init__(self, steps: int) -> None:
        self.left = steps

    def requested(self) -> bool:
        self.left -= 1
        return self.left <= 0


def run_folder(tmp_path: Path, demo: Path, name: str, every: int = 0, extra: str = "") -> tuple["RunLayout", str]:
    """A run folder for one demo BERT cell (GRID), ready for stage functions called in-process."""
    from dpr_hpc.grid import load_grid
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.bindings import save_plan

    text = textwrap.dedent(GRID.format(name=name, demo=demo, every=every)) + extra  # extra: more lines of the block
    grid_file = write_grid(tmp_path, text, f"{name}.yaml")
    grid = load_grid(grid_file)
    plan = make_plan(grid)
    layout = RunLayout(tmp_path / "runs" / name)
    save_plan(layout, plan, grid_file)
    return layout, plan.cells[0].cell_id


def train_folder(layout, cell_id: str):
    """The store folder of the cell's training job."""
    from dpr_hpc.planning.plan import StageJob
    from dpr_hpc.store.bindings import load_plan

    return layout.store.job(StageJob("train", load_plan(layout).keys[cell_id]["train"], 0))


def train_attempt(layout, cell_id: str):
    """The newest attempt of the cell's training: where its checkpoint, losses and resume state are."""
    return train_folder(layout, cell_id).latest_attempt()


def train_in_process(layout, cell_id: str, stop=None):
    from dpr_hpc.planning.plan import StageJob
    from dpr_hpc.store.bindings import load_plan
    from dpr_hpc.stages.runner import prepare_io
    from dpr_hpc.stages.train import train

    job = StageJob("train", load_plan(layout).keys[cell_id]["train"], 0)
    cell, io = prepare_io(layout.runs_root, job)
    return train(cell, io, 0, stop=stop)


@pytest.fixture(scope="session")
def tiny_dpr(demo_assets, tmp_path_factory) -> dict[str, Path]:
    """A tiny DPRQuestionEncoder and DPRContextEncoder (random weights, DPR's projection to 24
    dimensions) with a BERT tokenizer over the demo's vocabulary that emits segment ids, each
    saved as the hub's DPR checkpoints are: config.json naming the class, model.safetensors and
    the tokenizer files."""
    import torch
    from transformers import AutoTokenizer, BertTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    vocab = AutoTokenizer.from_pretrained(demo_assets / "models" / "tiny-bert").get_vocab()
    tokenizer = BertTokenizer(vocab=vocab)
    config = DPRConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=128, projection_dim=24, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("dpr")
    folders = {}
    for seed, (tower, model_class) in enumerate({"question": DPRQuestionEncoder, "passage": DPRContextEncoder}.items()):
        torch.manual_seed(seed)
        folder = out / f"dpr-{'question' if tower == 'question' else 'ctx'}_encoder-tiny"
        model_class(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[tower] = folder
    return folders


@contextmanager
def held_elsewhere(path: Path, clock_offset_s: float = 0.0, every_s: float = 0.02, **fields) -> Iterator[dict]:
    """A lock file whose holder lives on another host (node17): a thread advances its heartbeat
    counter every `every_s`, stamping it with a clock `clock_offset_s` off this one's, until the
    block ends."""
    holder = {"host": "node17", "pid": 4242, "slurm_job_id": "991", "purpose": "submit",
              "created": time.time() + clock_offset_s, "beat": 0, "token": "theirs", **fields}
    stop = threading.Event()

    def write() -> None:
        holder["heartbeat"] = time.time() + clock_offset_s
        tmp = path.with_name(f".{path.name}.beat")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, path)

    def beat() -> None:
        while not stop.wait(every_s):
            holder["beat"] += 1
            write()

    write()
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        yield holder
    finally:
        stop.set()
        beater.join()
