"""Which number format each stage computes in: `auto`'s rule by hardware, per-stage settings,
and the paper grid's fp16 training with fp32 encoding."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, run_cli, write_grid
from dpr_hpc.grid import load_grid
from dpr_hpc.grid.config import PrecisionConfig, cell_from_json
from dpr_hpc.modeling import precision as precision_module
from dpr_hpc.modeling.precision import auto_precision, grad_scaler, resolve_precision

# (GPU compute capability or None for a CPU, CPU has native bf16) -> what `auto` computes in.
AUTO_TABLE = {
    "Turing 7.5 (Titan RTX, T4): fp16": ((7, 5), False, "fp16"),
    "Volta 7.0 (V100): fp16": ((7, 0), False, "fp16"),
    "Ampere 8.0 (A100): bf16": ((8, 0), False, "bf16"),
    "Ampere 8.6 (A40, RTX 3090): bf16": ((8, 6), False, "bf16"),
    "Hopper 9.0 (H100): bf16": ((9, 0), False, "bf16"),
    "CPU with AVX512-BF16 or AMX: bf16": (None, True, "bf16"),
    "CPU without native bf16: fp32": (None, False, "fp32"),
}


@pytest.mark.parametrize("capability, cpu_bf16, expected", AUTO_TABLE.values(), ids=AUTO_TABLE.keys())
def test_auto_picks_bf16_only_where_the_hardware_computes_it(capability, cpu_bf16, expected):
    assert auto_precision(capability, cpu_bf16) == expected


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_resolve_reads_the_gpus_compute_capability_not_is_bf16_supported(monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() says yes on Turing (emulation); it must not be asked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"  # an explicit choice stands


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_resolve_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_only_fp16_training_gets_a_gradient_scaler():
    cpu = torch.device("cpu")
    assert grad_scaler("fp16", cpu) is not None
    assert grad_scaler("bf16", cpu) is None and grad_scaler("fp32", cpu) is None


def test_paper_grid_plans_fp16_training_and_fp32_encoding(capsys):
    code, out, _ = run_cli(capsys, "plan", REPO / "jobs" / "paper.yaml", "--json")
    assert code == 0
    precisions = {(c["train"] is not None, json.dumps(c["precision"], sort_keys=True)) for c in json.loads(out)["cells"]}
    assert precisions == {(True, '{"encode": "fp32", "train": "fp16"}'), (False, '{"encode": "fp32", "train": "fp16"}')}
    code, out, _ = run_cli(capsys, "plan", REPO / "jobs" / "paper.yaml")
    assert "PRECISION TRAIN/ENCODE" in out and "fp16/fp32" in out


def test_one_string_sets_both_stages_and_a_mapping_each(tmp_path, data_files):
    grid = write_grid(tmp_path, f"""\
        name: p
        data: {{train: {data_files}/train.json, dev: {data_files}/dev.json}}
        defaults: {{precision: bf16}}
        blocks:
          - name: both
            encoder: bert-base-uncased
            embedding_sizes: [64]
          - name: train-only
            encoder: bert-base-uncased
            precision: {{train: fp16}}
            embedding_sizes: [64]
        """)
    first, second = load_grid(grid).cells
    assert first.precision == PrecisionConfig("bf16", "bf16")
    assert second.precision == PrecisionConfig("fp16", "bf16")
    assert cell_from_json(json.loads(json.dumps(second.to_json()))) == second
    assert cell_from_json({**second.to_json(), "precision": "fp32"}).precision == PrecisionConfig("fp32", "fp32")  # older records


@pytest.mark.parametrize("setting, key", [("{precision: fp8}", "defaults.precision"), ("{precision: {encode: fp8}}", "defaults.precision.encode"),
                                          ("{precision: {infer: fp32}}", "defaults.precision.infer")])
def test_bad_precision_is_named(tmp_path, data_files, capsys, setting, key):
    grid = write_grid(tmp_path, f"""\
        name: p
        data: {{train: {data_files}/train.json, dev: {data_files}/dev.json}}
        defaults: {setting}
        blocks: [{{name: b, encoder: bert-base-uncased, embedding_sizes: [64]}}]
        """)
    code, _, err = run_cli(capsys, "plan", grid)
    assert code == 2 and f"{grid}: {key}:" in err and "Traceback" not in err
