"""The exact sbatch scripts of a train, an index and an infer job, pinned by golden files.

Set DPR_HPC_UPDATE_GOLDEN=1 to rewrite them after an intended change, then review the diff. A
test whose file that run rewrites fails, naming it, so an update run never passes: run again
without the variable to see the new files pass.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_grid
from dpr_hpc.backends.profile import grid_resources, load_profile, time_to_minutes
from dpr_hpc.backends.slurm import SlurmBackend
from dpr_hpc.errors import GridError, UsageError
from dpr_hpc.grid.resources import with_nodes
from dpr_hpc.grid import load_grid
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.inputs.hub import hub_cache_dir
from dpr_hpc.planning.plan import make_plan

GOLDEN = Path(__file__).parent / "golden"


def rendered_scripts(data_files: Path, tmp_path: Path, profile: Path, resources=None) -> dict[str, str]:
    """The dry run's script per stage, for one BERT cell under `profile` (or `resources`)."""
    grid = write_grid(data_files, """
        name: golden
        data: {train: train.json, dev: dev.json}
        blocks:
          - {name: bert, encoder: bert-base-uncased, embedding_sizes: [768], train: {batch_size: 16}}
    """)
    layout = RunLayout(tmp_path / "runs" / "golden")
    backend = SlurmBackend(layout, make_plan(load_grid(grid)), resources or load_profile(profile))
    rendered = {job.stage: script for job, script in backend.dry_run()}
    # Machine-specific parts: where the run folder, the interpreter and the hub cache are.
    return {stage: text.replace(str(layout.runs_root), "<RUNS>").replace(sys.executable, "<PYTHON>")
            .replace(str(hub_cache_dir().resolve()), "<HF_HUB_CACHE>") for stage, text in rendered.items()}


def assert_matches_golden(text: str, name: str, folder: Path = GOLDEN) -> None:
    """`text` is the committed golden file `name`. With DPR_HPC_UPDATE_GOLDEN=1 a differing
    file is rewritten and the test fails all the same: comparing against the file just written
    would always pass."""
    golden = folder / name
    if golden.is_file() and text == golden.read_text():
        return
    if os.environ.get("DPR_HPC_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
        pytest.fail(f"DPR_HPC_UPDATE_GOLDEN=1 rewrote {golden}: review its diff, then run again without the variable")
    assert golden.is_file(), f"{golden}: no golden file; DPR_HPC_UPDATE_GOLDEN=1 writes it"
    assert text == golden.read_text(), f"{golden}: differs (DPR_HPC_UPDATE_GOLDEN=1 rewrites it after an intended change)"


@pytest.fixture
def scripts(data_files, tmp_path):
    return rendered_scripts(data_files, tmp_path, REPO / "slurm_templates" / "gpu24.yaml")


@pytest.mark.parametrize("stage", ["train", "index", "infer"])
def test_dry_run_sbatch_script_matches_golden_file(scripts, stage):
    assert_matches_golden(scripts[stage], f"sbatch_{stage}.txt")


def test_an_update_run_rewrites_a_changed_golden_file_and_still_fails(tmp_path, monkeypatch):
    (tmp_path / "pinned.txt").write_text("old\n")
    monkeypatch.setenv("DPR_HPC_UPDATE_GOLDEN", "1")
    with pytest.raises(pytest.fail.Exception, match="rewrote .*pinned.txt: review its diff"):
        assert_matches_golden("new\n", "pinned.txt", tmp_path)
    assert (tmp_path / "pinned.txt").read_text() == "new\n"
    assert_matches_golden("new\n", "pinned.txt", tmp_path)  # the next run compares against the committed file
    monkeypatch.delenv("DPR_HPC_UPDATE_GOLDEN")
    with pytest.raises(AssertionError, match="pinned.txt: differs"):
        assert_matches_golden("other\n", "pinned.txt", tmp_path)


def test_a_profile_setting_every_key_gives_the_golden_script(data_files, tmp_path):
    """Placement, exclusivity, reservation, mail, the user's comment after the tag, and other
    sbatch options, as sbatch reads them; the job runs with the hub offline."""
    index = rendered_scripts(data_files, tmp_path, GOLDEN / "profile_every_key.yaml")["index"]
    assert_matches_golden(index, "sbatch_every_key_index.txt")


def test_exclude_node_and_nodelist_flags_replace_the_profile_hosts(data_files, tmp_path):
    resources = with_nodes(load_profile(GOLDEN / "profile_every_key.yaml"), "gpu05", "gpu[20-21]", ("--exclude-node", "--nodelist"))
    index = rendered_scripts(data_files, tmp_path, Path(), resources)["index"]
    assert "#SBATCH --exclude=gpu05\n" in index and "#SBATCH --nodelist='gpu[20-21]'\n" in index
    assert "gpu07" not in index and "gpu[10-12]" not in index
    with pytest.raises(UsageError, match=r"^--nodelist: expected a SLURM hostlist"):
        with_nodes(resources, None, "gpu01 gpu02", ("--exclude-node", "--nodelist"))


def test_dry_run_writes_nothing(data_files, tmp_path):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    layout = RunLayout(tmp_path / "runs" / "g")
    SlurmBackend(layout, make_plan(load_grid(grid)), load_profile(REPO / "slurm_templates" / "test-cluster.yaml")).dry_run()
    assert not layout.root.exists()


def test_slurm_time_formats():
    assert [time_to_minutes(t) for t in ("48:00:00", "2-00:00:00", "90", "1:30", "0:00:01", 15)] == [2880, 2880, 90, 2, 1, 15]


def test_profile_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages: {train: {tim: '1:00:00'}}\n")
    with pytest.raises(GridError, match=r"p.yaml: stages.train.tim: unknown key"):
        load_profile(bad)
    bad.write_text("stages: {train: {time: soon}}\n")
    with pytest.raises(GridError, match=r"stages.train.time: expected a SLURM time"):
        load_profile(bad)
    bad.write_text("stages: {tokenize: {}}\n")
    with pytest.raises(GridError, match=r"stages.tokenize: unknown stage"):
        load_profile(bad)


def test_grid_slurm_section_overrides_its_profile_and_command_line_profile_replaces_it(data_files):
    grid = write_grid(data_files, f"""
        name: g
        data: {{train: train.json, dev: dev.json}}
        slurm:
          profile: {REPO / "slurm_templates" / "gpu24.yaml"}
          stages: {{train: {{time: "12:00:00"}}}}
        blocks: [{{name: b, encoder: x/y, embedding_sizes: [8]}}]
    """)
    loaded = load_grid(grid)
    own = grid_resources(loaded)
    assert (own["train"].time_min, own["train"].partition, own["index"].time_min) == (720, "gpu", 720)
    replaced = grid_resources(loaded, REPO / "slurm_templates" / "test-cluster.yaml")
    assert (replaced["train"].time_min, replaced["train"].partition, replaced["index"].time_min) == (720, "debug", 10)


def test_grid_slurm_section_errors_name_the_grid_key(data_files):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nslurm: {stages: {train: {tyme: 1}}}\n"
                      "blocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    with pytest.raises(GridError, match=r"grid.yaml: slurm.stages.train.tyme: unknown key"):
        load_grid(grid)
    grid.write_text(grid.read_text().replace("stages: {train: {tyme: 1}}", "profile: nowhere.yaml"))
    with pytest.raises(GridError, match=r"nowhere.yaml: cluster profile not found"):
        load_grid(grid)


def test_submit_takes_the_node_flags_onto_every_script_and_refuses_a_bad_hostlist(data_files, tmp_path, capsys):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, out, _ = run_cli(capsys, "submit", grid, "--dry-run", "--exclude-node", "gpu[01-02]", "--runs-root", tmp_path / "runs")
    assert code == 0 and out.count("#SBATCH --exclude='gpu[01-02]'\n") == 3
    code, out, err = run_cli(capsys, "submit", grid, "--dry-run", "--nodelist", "gpu[04-01]", "--runs-root", tmp_path / "runs")
    assert code == 2 and out == "" and err == "dpr-hpc: error: --nodelist: expected a SLURM hostlist such as 'gpu[01-04],gpu07' (or a list of host names), got 'gpu[04-01]'\n"
