"""One optimisation step of the bi-encoder, shared by the train stage and `dpr-hpc bench`, so
that the bench times the code the training runs.

A batch arrives as lists of padded batches per tower: one each for a plain step, several (the
chunks) for the gradient cache.
"""

from __future__ import annotations

import torch

from dpr_hpc.modeling.grad_cache import grad_cache_backward
from dpr_hpc.modeling.loss import dpr_nll_loss
from dpr_hpc.modeling.precision import autocast


def backward_batch(question_tower: torch.nn.Module, passage_tower: torch.nn.Module, question_batches: list[dict], passage_batches: list[dict],
                   grad_cache: bool, precision: str, device: torch.device, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Accumulate the batch's parameter gradients; returns its (unscaled) loss. The loss is
    computed in fp32 whatever the autocast precision."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    if grad_cache:
        return grad_cache_backward(question_tower, passage_tower, question_batches, passage_batches, lambda: autocast(precision, device), scale)
    (questions,), (passages,) = question_batches, passage_batches
    with autocast(precision, device):
        question_vectors, passage_vectors = question_tower(**questions), passage_tower(**passages)
    loss = dpr_nll_loss(question_vectors.float(), passage_vectors.float())
    scale(loss).backward()
    return loss


def clip_and_step(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, max_grad_norm: float) -> None:
    """Clip (unless `max_grad_norm` is 0: the paper's code never clipped) and step; with fp16
    the gradients are unscaled before clipping, and a step whose gradients overflowed is
    skipped by the scaler."""
    if max_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the full LR, then linear decay, the multiplier never below `floor`:
    the paper's lr_lambda with floor 1e-7, DPR's (and transformers') with floor 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, floor))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(floor, (total_steps - step) / max(1, total_steps - warmup_steps))
