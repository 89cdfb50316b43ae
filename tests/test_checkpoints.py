"""Checkpoints load with the class they were saved with, and a weight that does not load is an
error, in the stage and already when the grid is planned (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli, write_grid
from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer
from dpr_hpc.errors import CheckpointError

DELETED_WEIGHT = "ctx_encoder.bert_model.encoder.layer.1.attention.self.query.weight"


def dpr_reference(folder: Path, model_class: str, inputs: list) -> np.ndarray:
    """transformers' own pooler_output, one unpadded input at a time, segment ids all 0."""
    import transformers

    model = getattr(transformers, model_class).from_pretrained(folder).eval()
    tokenizer = load_tokenizer(str(folder))
    rows = []
    with torch.inference_mode():
        for item in inputs:
            encoded = tokenizer(*(item if isinstance(item, tuple) else (item,)), truncation=True, max_length=64, return_tensors="pt")
            encoded["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
            rows.append(model(**encoded).pooler_output[0].numpy())
    return np.stack(rows)


def eval_grid(folder: Path, demo: Path, question: Path, passage: Path, name: str = "dpr-tiny") -> Path:
    return write_grid(folder, f"""\
        name: {name}
        data: {{dev: {demo}/dev.json}}
        defaults: {{text: {{max_length: 64, passage_format: dpr}}, index: {{type: flat}}, precision: fp32}}
        blocks:
          - name: original-dpr
            question_encoder: {question}
            passage_encoder: {passage}
            evaluate_only: true
            embedding_sizes: [24]
        """, f"{name}.yaml")


def broken_copy(folder: Path, to: Path, weight: str = DELETED_WEIGHT) -> Path:
    """`folder` with one weight deleted from its model.safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    weights = load_file(to / "model.safetensors")
    del weights[weight]
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_evaluation_only_dpr_cell_gives_the_classes_own_pooler_output(tiny_dpr, demo_assets, tmp_path):
    from dpr_hpc.inputs.data import iter_records
    from dpr_hpc.inputs.prepared import load_dev
    from dpr_hpc.grid import load_grid
    from dpr_hpc.store.layout import RunLayout
    from dpr_hpc.modeling.batching import tokenize_questions
    from dpr_hpc.modeling.encoding import encode
    from dpr_hpc.modeling.searcher import load_index
    from dpr_hpc.planning.plan import make_plan
    from dpr_hpc.store.bindings import save_plan
    from dpr_hpc.stages.common import load_trained_tower
    from dpr_hpc.stages.index import index
    from dpr_hpc.stages.runner import prepare_io

    grid_file = eval_grid(tmp_path, demo_assets, tiny_dpr["question"], tiny_dpr["passage"])
    grid = load_grid(grid_file)
    layout = RunLayout(tmp_path / "runs" / grid.name)
    plan = make_plan(grid)
    save_plan(layout, plan, grid_file)
    cell, io = prepare_io(layout.runs_root, plan.cell_jobs(grid.cells[0].cell_id, "index")[0])

    output = index(cell, io, 0)
    faiss_index = load_index(io.out.index_file, cell.index)
    indexed = faiss_index.reconstruct_n(0, faiss_index.ntotal)
    records = list(iter_records(demo_assets / "dev.json"))
    pool = {p.passage_id: p for p in load_dev(demo_assets / "dev.json", tmp_path / "cache").pool}
    ids = [i.decode() for i in np.load(io.out.passage_ids).tolist()]
    expected = dpr_reference(tiny_dpr["passage"], "DPRContextEncoder", [(pool[i].title, pool[i].text) for i in ids])
    assert indexed.shape == (len(pool), 24)
    np.testing.assert_allclose(indexed, expected, rtol=0, atol=1e-5)
    assert output.details["passage_format"] == "dpr" and output.details["precision"] == "fp32"

    questions = [r["question"] for r in records[:20]]
    encoder, tokenizer = load_trained_tower(cell, io, "question", torch.device("cpu"))
    vectors = encode(encoder, tokenize_questions(tokenizer, questions, 64), tokenizer.pad_token_id, 8, torch.device("cpu")).embeddings
    np.testing.assert_allclose(vectors, dpr_reference(tiny_dpr["question"], "DPRQuestionEncoder", questions), rtol=0, atol=1e-5)


def test_passage_checkpoint_is_not_loaded_as_a_question_encoder(tiny_dpr):
    """The bug: AutoModel maps every `dpr` config to DPRQuestionEncoder, none of whose weights
    a DPRContextEncoder checkpoint holds, so it ran with random weights."""
    from transformers import AutoModel, DPRContextEncoder

    tower = DprEncoder.from_pretrained(str(tiny_dpr["passage"]), 24)
    assert type(tower.backbone) is DPRContextEncoder and tower.uses_pooler and not tower.projected
    _, info = AutoModel.from_pretrained(tiny_dpr["passage"], output_loading_info=True)
    assert info["missing_keys"], "AutoModel now loads DPR passage encoders itself; the class choice could go"


def test_a_deleted_weight_fails_the_stage_load_naming_it(tiny_dpr, tmp_path):
    broken = broken_copy(tiny_dpr["passage"], tmp_path / "broken")
    with pytest.raises(CheckpointError, match=DELETED_WEIGHT.replace(".", r"\.")):
        DprEncoder.from_pretrained(str(broken), 24)


def test_a_deleted_weight_fails_at_plan_time_naming_it(tiny_dpr, demo_assets, tmp_path, capsys):
    broken = broken_copy(tiny_dpr["passage"], tmp_path / "broken")
    grid = eval_grid(tmp_path, demo_assets, tiny_dpr["question"], broken)
    code, _, err = run_cli(capsys, "plan", grid)
    assert code == 2 and "Traceback" not in err
    assert f"{grid}: block original-dpr, passage_encoder:" in err and DELETED_WEIGHT in err and "missing weights" in err
    intact = eval_grid(tmp_path, demo_assets, tiny_dpr["question"], tiny_dpr["passage"], "intact")
    assert run_cli(capsys, "plan", intact)[0] == 0
    code, _, err = run_cli(capsys, "submit", grid, "--backend", "local", "--runs-root", tmp_path / "runs")
    assert code == 2 and DELETED_WEIGHT in err and not (tmp_path / "runs").exists()  # stopped before anything started


def test_known_harmless_keys_do_not_fail(tmp_path):
    """A pre-training head the backbone lacks (BERT's cls.*) and a pooler a first-token tower
    never calls are not errors; a missing encoder weight is."""
    from transformers import BertConfig, BertForPreTraining, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    BertForPreTraining(config).save_pretrained(tmp_path / "with-head")
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "no-pooler")
    for name in ("with-head", "no-pooler"):
        assert DprEncoder.from_pretrained(str(tmp_path / name), 16).native_size == 16
    broken = broken_copy(tmp_path / "no-pooler", tmp_path / "broken", "encoder.layer.0.output.dense.weight")
    with pytest.raises(CheckpointError, match=r"missing weights: encoder\.layer\.0\.output\.dense\.weight"):
        DprEncoder.from_pretrained(str(broken), 16)


def with_extra_weights(folder: Path, to: Path, extra: dict) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    weights = load_file(to / "model.safetensors")
    save_file({**weights, **extra}, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_dpr_checkpoint_with_a_bert_pooler_loads_but_extra_encoder_layers_do_not(tiny_dpr, tmp_path):
    """DPR's own BERT kept a pooler that transformers' DPR classes lack: harmless. A weight of
    the model's own modules that it has no place for is not."""
    pooler = {"ctx_encoder.bert_model.pooler.dense.weight": torch.zeros(32, 32), "ctx_encoder.bert_model.pooler.dense.bias": torch.zeros(32)}
    assert DprEncoder.from_pretrained(str(with_extra_weights(tiny_dpr["passage"], tmp_path / "pooler", pooler)), 24).uses_pooler
    extra_layer = {"ctx_encoder.bert_model.encoder.layer.5.output.dense.bias": torch.zeros(32)}
    with pytest.raises(CheckpointError, match=r"weights it does not use: ctx_encoder\.bert_model\.encoder\.layer\.5"):
        DprEncoder.from_pretrained(str(with_extra_weights(tiny_dpr["passage"], tmp_path / "layer", extra_layer)), 24)


def test_dpr_config_naming_no_encoder_class_is_an_error(tiny_dpr, tmp_path):
    folder = shutil.copytree(tiny_dpr["passage"], tmp_path / "unnamed")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["DPRReader"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot tell which encoder"):
        DprEncoder.from_pretrained(str(folder), 24)


def hub_cache_entry(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` placed in a Hugging Face hub cache as a download would leave it."""
    commit = "0" * 40
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_plan_checks_hub_models_in_the_cache_and_skips_others(tiny_dpr, demo_assets, tmp_path):
    cache = tmp_path / "hub"
    hub_cache_entry(cache, "tiny/dpr-question_encoder", tiny_dpr["question"])
    hub_cache_entry(cache, "tiny/dpr-ctx_encoder-broken", broken_copy(tiny_dpr["passage"], tmp_path / "broken"))
    broken = eval_grid(tmp_path, demo_assets, "tiny/dpr-question_encoder", "tiny/dpr-ctx_encoder-broken", "cached")
    absent = eval_grid(tmp_path, demo_assets, "tiny/dpr-question_encoder", "nobody/not-in-the-cache", "absent")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = textwrap.dedent(f"""\
        import sys
        from dpr_hpc.cli.main import main
        print("codes", main(["plan", {str(broken)!r}]), main(["plan", {str(absent)!r}]))
        """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "codes 2 0" in done.stdout, done.stderr
    assert "block original-dpr, passage_encoder" in done.stderr and DELETED_WEIGHT in done.stderr
