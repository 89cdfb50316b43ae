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


def test_shuffle_draws_a_fresh_negative_each_epoch_from_each_pool():
    """`hard_negative: shuffle`: an offset into each example's pool, a new draw every epoch,
    the same draw for the same seed and epoch (what makes resuming exact)."""
    from dpr_hpc.stages.train import epoch_negatives

    sizes = np.array([3] * 200 + [1, 0])
    draws = [epoch_negatives(sizes, seed=1234, epoch=e) for e in range(4)]
    assert all(((d >= 0) & (d < np.maximum(sizes, 1))).all() for d in draws)
    assert all(not np.array_equal(draws[a], draws[b]) for a in range(4) for b in range(a + 1, 4))
    assert all(d[-2] == 0 and d[-1] == 0 for d in draws)  # one negative, or none: nothing to draw
    assert np.array_equal(epoch_negatives(sizes, 1234, 2), draws[2])
    assert not np.array_equal(epoch_negatives(sizes, 4321, 2), draws[2])
    per_example = np.stack(draws)[:, :200]
    assert (np.ptp(per_example, axis=0) > 0).mean() > 0.8  # most examples see more than one negative
    assert set(np.unique(per_example)) == {0, 1, 2}


def test_lr_follows_the_papers_schedule_with_its_floor():
    from dpr_hpc.modeling.train_step import lr_multiplier

    assert [lr_multiplier(s, 4, 10, 1e-7) for s in (0, 2, 4, 7)] == [0.0, 0.5, 1.0, 0.5]
    assert lr_multiplier(10, 4, 10, 1e-7) == 1e-7 and lr_multiplier(12, 4, 10, 1e-7) == 1e-7
    assert lr_multiplier(10, 4, 10, 0.0) == 0.0  # DPR's (and transformers') floor


def test_no_clipping_by_default_and_clipping_when_asked():
    import torch

    from dpr_hpc.grid import TrainConfig
    from dpr_hpc.modeling.train_step import clip_and_step

    assert (TrainConfig.max_grad_norm, TrainConfig.weight_decay, TrainConfig.lr_floor, TrainConfig.seed) == (0.0, 0.01, 1e-7, 1234)
    norms = {}
    for max_norm in (0.0, 1.0):
        weight = torch.nn.Parameter(torch.zeros(4))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        weight.grad = torch.full((4,), 10.0)
        clip_and_step([weight], optimizer, None, max_norm)
        norms[max_norm] = weight.detach().norm().item()
    assert norms[0.0] == pytest.approx(20.0) and norms[1.0] == pytest.approx(1.0)
