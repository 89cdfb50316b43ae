"""The fast training path (per-batch padding to a multiple of 8, mixed precision) follows the
plain path (every batch padded to the full length, fp32) on the demo, with the demo's dropout 0
(dropout masks are drawn per padded position, so with dropout on the two paths draw different ones).

Tolerances: padding only adds masked positions, so fp32 with and without it differs by float
rounding alone (losses within 1e-4 relative). bf16 keeps 8 bits of mantissa, so its losses
drift: within 5% of fp32's at every epoch over two epochs of the demo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_folder, train_attempt, train_in_process



def _curve(tmp_path, demo, name: str, precision: str, monkeypatch, pad_multiple: int) -> tuple[list[float], list[float]]:
    monkeypatch.setattr("dpr_hpc.stages.train.PAD_MULTIPLE", pad_multiple)
    tmp_path.mkdir()
    layout, cell_id = run_folder(tmp_path, demo, name, extra=f"    precision: {precision}\n    train: {{dropout: 0.0}}\n")
    output = train_in_process(layout, cell_id)
    assert output.details["precision"] == precision
    losses = json.loads(train_attempt(layout, cell_id).losses.read_text())
    return losses["step_losses"], losses["epoch_losses"]


@pytest.mark.slow
def test_fast_training_follows_the_plain_paths_loss_curve(demo_assets, tmp_path, monkeypatch):
    plain_steps, plain_epochs = _curve(tmp_path / "plain", demo_assets, "plain", "fp32", monkeypatch, pad_multiple=64)
    fast_steps, _ = _curve(tmp_path / "fast", demo_assets, "fast", "fp32", monkeypatch, pad_multiple=8)
    assert np.allclose(fast_steps, plain_steps, rtol=1e-4)
    _, bf16_epochs = _curve(tmp_path / "bf16", demo_assets, "bf16", "bf16", monkeypatch, pad_multiple=8)
    assert np.allclose(bf16_epochs, plain_epochs, rtol=0.05), (bf16_epochs, plain_epochs)
    assert plain_epochs[-1] < plain_epochs[0]  # it does learn
