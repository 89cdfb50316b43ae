"""Cluster profiles are validated completely at load: SLURM's time grammar, every field's type,
and no value that could leave its #SBATCH line. Each error is one line naming file and key."""

from __future__ import annotations

import re
import textwrap

import pytest

from conftest import REPO, run_cli, write_grid
from dpr_hpc.backends.profile import grid_resources, load_profile, time_to_minutes
from dpr_hpc.backends.slurm import SlurmBackend
from dpr_hpc.grid import load_grid
from dpr_hpc.grid.resources import SBATCH_SAFE, StageResources
from dpr_hpc.store.layout import RunLayout
from dpr_hpc.planning.plan import make_plan

# Every form sbatch --time takes, as SLURM reads it (seconds round up to a minute).
TIMES = [
    ("90", 90), (90, 90),                      # minutes
    ("1:30", 2), ("90:00", 90),                # minutes:seconds
    ("48:00:00", 2880), ("0:00:01", 1),        # hours:minutes:seconds
    ("1-12", 2160), ("2-0", 2880),             # days-hours
    ("2-12:00", 3600), ("0-1:30", 90),         # days-hours:minutes
    ("2-00:00:00", 2880), ("1-0:0:1", 1441),   # days-hours:minutes:seconds
]


@pytest.mark.parametrize(("value", "minutes"), TIMES, ids=[repr(v) for v, _ in TIMES])
def test_slurm_time_grammar(value, minutes):
    assert time_to_minutes(value) == minutes


@pytest.mark.parametrize(("unquoted", "minutes"), [("48:00:00", 2880), ("1:30", 2), ("12:00:00", 720)])
def test_an_unquoted_clock_time_in_yaml_is_read_as_written_not_as_base_60(tmp_path, unquoted, minutes):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"stages:\n  train: {{time: {unquoted}, signal_delay_s: 30}}\n")
    assert load_profile(profile)["train"].time_min == minutes


def test_a_grid_slurm_section_reads_unquoted_times_the_same_way(data_files):
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nslurm: {stages: {train: {time: 48:00:00}}}\n"
                      "blocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    assert grid_resources(load_grid(grid))["train"].time_min == 2880


BAD_PROFILES = [
    # (profile body, key named in the error)
    ("stages: {train: {time: 1.5}}", "stages.train.time"),
    ("stages: {train: {time: null}}", "stages.train.time"),
    ("stages: {train: {time: true}}", "stages.train.time"),
    ("stages: {train: {time: soon}}", "stages.train.time"),
    ("stages: {train: {time: 0}}", "stages.train.time"),
    ("stages: {train: {time: '1-24'}}", "stages.train.time"),
    ("stages: {train: {time: '12:60:00'}}", "stages.train.time"),
    ("stages: {train: {time: UNLIMITED}}", "stages.train.time"),
    ("defaults: {mem_gb: lots}", "defaults.mem_gb"),
    ("defaults: {mem_gb: '64 G'}", "defaults.mem_gb"),
    ("defaults: {mem_gb: true}", "defaults.mem_gb"),
    ("defaults: {mem_gb: -1}", "defaults.mem_gb"),
    ("defaults: {mem_gb: .nan}", "defaults.mem_gb"),
    ("defaults: {cpus_per_task: '8'}", "defaults.cpus_per_task"),
    ("defaults: {cpus_per_task: 0}", "defaults.cpus_per_task"),
    ("defaults: {cpus_per_task: true}", "defaults.cpus_per_task"),
    ("stages: {index: {max_requeues: -1}}", "stages.index.max_requeues"),
    ("stages: {index: {signal_delay_s: 2.5}}", "stages.index.signal_delay_s"),
    ("stages: {infer: {time: '1:00:00', signal_delay_s: 3600}}", "stages.infer.signal_delay_s"),
    ("defaults: {signal_delay_s: 900}\nstages: {infer: {time: '10'}}", "stages.infer.signal_delay_s"),
    ('defaults: {partition: "gpu\\ntouch pwned #"}', "defaults.partition"),
    ('defaults: {account: "proj\\rx"}', "defaults.account"),
    ('defaults: {qos: "high\\tx"}', "defaults.qos"),
    ('defaults: {qos: "high x"}', "defaults.qos"),
    ('stages: {train: {gres: "gpu:1\\u0085--time=1"}}', "stages.train.gres"),
    ('defaults: {partition: 5}', "defaults.partition"),
    ('defaults: {setup: "source .venv/bin/activate"}', "defaults.setup"),
    ('defaults: {setup: [1]}', "defaults.setup"),
    ('defaults: {setup: ["a\\nb"]}', "defaults.setup"),
    ("defaults: {partiton: gpu}", "defaults.partiton"),
    ("stages: {tokenize: {}}", "stages.tokenize"),
    ("stages: [train]", "stages"),
    ("description: 5", "description"),
    ("- a list", "(top level)"),
    ("defaults: {partition: [unclosed", ""),
    # the placement, mail and pass-through keys (issue 16)
    ('defaults: {constraint: "a100 && ib"}', "defaults.constraint"),
    ('defaults: {constraint: "a100\\ntouch x"}', "defaults.constraint"),
    ("defaults: {constraint: 5}", "defaults.constraint"),
    ('stages: {index: {exclude: "gpu[04-01]"}}', "stages.index.exclude"),
    ('stages: {index: {exclude: "gpu01;reboot"}}', "stages.index.exclude"),
    ("stages: {index: {exclude: [gpu01, 7]}}", "stages.index.exclude"),
    ('stages: {infer: {nodelist: "gpu[01-"}}', "stages.infer.nodelist"),
    ('stages: {infer: {nodelist: "gpu01 gpu02"}}', "stages.infer.nodelist"),
    ("stages: {index: {exclusive: yes please}}", "stages.index.exclusive"),
    ("stages: {index: {exclusive: 1}}", "stages.index.exclusive"),
    ("defaults: {reservation: 'maint window'}", "defaults.reservation"),
    ("defaults: {reservation: [r1]}", "defaults.reservation"),
    ("defaults: {mail_type: SOMETIMES}", "defaults.mail_type"),
    ("defaults: {mail_type: 'END,FAIL,'}", "defaults.mail_type"),
    ("defaults: {mail_type: [END, 3]}", "defaults.mail_type"),
    ("defaults: {mail_user: alice}", "defaults.mail_user"),
    ("defaults: {mail_user: 'alice@example.org; rm -rf ~'}", "defaults.mail_user"),
    ("defaults: {comment: 'two words'}", "defaults.comment"),
    ("defaults: {comment: \"it's\"}", "defaults.comment"),
    ("defaults: {sbatch_extra: [gpu-bind]}", "defaults.sbatch_extra"),
    ("defaults: {sbatch_extra: {--gpu-bind: closest}}", "defaults.sbatch_extra.--gpu-bind"),
    ("defaults: {sbatch_extra: {gpu_bind: closest}}", "defaults.sbatch_extra.gpu_bind"),
    ("defaults: {sbatch_extra: {time: 10}}", "defaults.sbatch_extra.time"),
    ("defaults: {sbatch_extra: {comment: mine}}", "defaults.sbatch_extra.comment"),
    ("defaults: {sbatch_extra: {requeue: true}}", "defaults.sbatch_extra.requeue"),
    ("defaults: {sbatch_extra: {signal: USR1@60}}", "defaults.sbatch_extra.signal"),
    ("defaults: {sbatch_extra: {exclusive: true}}", "defaults.sbatch_extra.exclusive"),
    ("defaults: {sbatch_extra: {gpu-bind: 'closest;id'}}", "defaults.sbatch_extra.gpu-bind"),
    ("defaults: {sbatch_extra: {gpu-bind: false}}", "defaults.sbatch_extra.gpu-bind"),
    ("defaults: {sbatch_extra: {gpu-bind: [closest]}}", "defaults.sbatch_extra.gpu-bind"),
]


@pytest.mark.parametrize(("body", "key"), BAD_PROFILES, ids=[b for b, _ in BAD_PROFILES])
def test_every_profile_error_is_one_line_naming_file_and_key_with_exit_2(data_files, tmp_path, capsys, body, key):
    profile = tmp_path / "bad-profile.yaml"
    profile.write_text(body + "\n")
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    code, out, err = run_cli(capsys, "submit", grid, "--dry-run", "--profile", profile, "--runs-root", tmp_path / "runs")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"dpr-hpc: error: {profile}: {key}" if key else f"dpr-hpc: error: {profile}: ")


def test_a_grid_slurm_section_is_validated_at_load_naming_the_grid_key(data_files):
    from dpr_hpc.errors import GridError

    grid = write_grid(data_files, 'name: g\ndata: {train: train.json, dev: dev.json}\nslurm: {defaults: {account: "a\\nb"}}\n'
                      "blocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    with pytest.raises(GridError, match=r"grid.yaml: slurm.defaults.account: expected a SLURM name"):
        load_grid(grid)


def test_memory_strings_and_fractions_reach_sbatch_as_slurm_reads_them(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("defaults: {mem_gb: 64G}\nstages: {index: {mem_gb: 1.5}, infer: {mem_gb: 32}}\n")
    loaded = load_profile(profile)
    assert [loaded[s].sbatch_mem for s in ("train", "index", "infer")] == ["64G", "1536MB", "32GB"]


# A valid value for every profile key, each as odd as the key allows, and the directive it must give.
EVERY_KEY = {
    "partition": ("gpu,gpu-long", "--partition=gpu,gpu-long"),
    "gres": ("gpu:a100:1", "--gres=gpu:a100:1"),
    "cpus_per_task": (6, "--cpus-per-task=6"),
    "mem_gb": ("500M", "--mem=500M"),
    "time": ("1-12", "--time=2160"),
    "account": ("proj_42@site", "--account=proj_42@site"),
    "qos": ("high+", "--qos=high+"),
    "setup": (["module load cuda/12.1 # 'quoted' $HOME"], None),
    "signal_delay_s": (450, "--signal=USR2@450"),
    "max_requeues": (3, None),
    "constraint": ("[rack1|rack2]&a100", "--constraint='[rack1|rack2]&a100'"),
    "exclude": ("gpu[01-04,09],gpu07", "--exclude='gpu[01-04,09],gpu07'"),
    "nodelist": ("node-a.cluster", "--nodelist=node-a.cluster"),
    "exclusive": ("user", "--exclusive=user"),
    "reservation": ("maint_2026", "--reservation=maint_2026"),
    "mail_type": ("end,TIME_LIMIT_90", "--mail-type=END,TIME_LIMIT_90"),
    "mail_user": ("alice.b+dpr@uni.example.org", "--mail-user=alice.b+dpr@uni.example.org"),
    "comment": ("paper-run/2", "--comment='dpr-hpc:<tag>,paper-run/2'"),
    "sbatch_extra": ({"gpu-bind": "closest", "switches": 1, "spread-job": True}, "--spread-job"),
}


def test_every_profile_key_is_covered_here():
    assert set(EVERY_KEY) == {f for f in StageResources.__dataclass_fields__}


@pytest.mark.parametrize("key", sorted(EVERY_KEY))
def test_no_profile_value_escapes_its_sbatch_line(data_files, tmp_path, key):
    value, directive = EVERY_KEY[key]
    profile = tmp_path / "p.yaml"
    profile.write_text(textwrap.dedent(f"""\
        defaults: {{time: "1:00:00"}}
        stages: {{train: {{{key}: {value!r}}}}}
    """).replace("'", '"') if key != "setup" else f"stages:\n  train:\n    setup: {value!r}\n")
    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    backend = SlurmBackend(RunLayout(tmp_path / "runs" / "g"), make_plan(load_grid(grid)), load_profile(profile))
    script = dict((job.stage, text) for job, text in backend.dry_run())["train"]
    lines = script.splitlines()
    # sbatch reads directives up to the first line that is neither a comment nor blank.
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert all(re.fullmatch(r"#SBATCH --[a-z-]+(=\S+)?", line) for line in directives), directives
    assert not any("#SBATCH" in line for line in lines[first_command:])
    job_name = next(line for line in directives if line.startswith("#SBATCH --job-name="))
    assert SBATCH_SAFE.fullmatch(job_name.split("=", 1)[1])
    if directive:
        assert f"#SBATCH {directive}" in directives
    if key == "setup":  # shell, after the directives (max_requeues is submitit's, not sbatch's)
        assert "module load cuda/12.1 # 'quoted' $HOME" in lines[first_command:]
    for always in ("--time=", "--signal=USR2@", "--job-name="):
        assert any(line.startswith(f"#SBATCH {always}") for line in directives)


def test_the_shipped_profiles_load(tmp_path):
    for profile in sorted((REPO / "slurm_templates").glob("*.yaml")):
        assert set(load_profile(profile)) == {"train", "index", "infer", "encode-shard", "search-shard", "merge"}


def test_a_run_folder_path_that_would_break_sbatch_lines_is_refused(data_files, tmp_path):
    from dpr_hpc.errors import UsageError

    grid = write_grid(data_files, "name: g\ndata: {train: train.json, dev: dev.json}\nblocks: [{name: b, encoder: x/y, embedding_sizes: [8]}]\n")
    with pytest.raises(UsageError, match="must not contain spaces"):
        SlurmBackend(RunLayout(tmp_path / "my runs" / "g"), make_plan(load_grid(grid)), load_profile(REPO / "slurm_templates" / "gpu24.yaml"))


@pytest.mark.parametrize("first", ["dpr_hpc.backends.profile", "dpr_hpc.grid", "dpr_hpc.backends.slurm"])
def test_no_import_circle_between_the_grid_and_the_backends(first):
    """The grid validates its raw slurm section with dpr_hpc.grid.resources; only the backends
    import the grid, never the reverse, whichever is imported first."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {first}; import dpr_hpc.grid.loader, dpr_hpc.backends.profile"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for module in (REPO / "dpr_hpc" / "grid").glob("*.py"):
        assert "from dpr_hpc.backends" not in module.read_text() and "import dpr_hpc.backends" not in module.read_text(), module
