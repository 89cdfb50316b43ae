"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): DPR's in-batch contrastive loss over a large batch with the activation memory of
one small chunk.

1. Encode every chunk without a graph, noting the RNG state before each (dropout masks).
2. Compute the loss over the whole batch from those embeddings; backward gives the gradient of
   the loss with respect to each embedding, which is all the towers need to know of the loss.
3. Re-encode each chunk, with its RNG state restored so dropout draws the same masks, and
   backpropagate its cached gradient through the tower.

The parameter gradients equal those of the full-batch step up to float rounding; the price is a
second forward pass, about a third more compute per step (Gao et al. report ~20% more time).
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch

from dpr_hpc.modeling.loss import dpr_nll_loss

Batch = dict[str, torch.Tensor]


def grad_cache_backward(
    question_tower: torch.nn.Module, passage_tower: torch.nn.Module,
    question_chunks: list[Batch], passage_chunks: list[Batch],
    autocast: Callable[[], ContextManager] = lambda: torch.autocast("cpu", enabled=False),
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> torch.Tensor:
    """Accumulate the full batch's parameter gradients chunk by chunk; returns the (unscaled)
    loss. `scale` is the grad scaler's (fp16), applied to the loss before the first backward."""
    questions, question_states = _encode_without_graph(question_tower, question_chunks, autocast)
    passages, passage_states = _encode_without_graph(passage_tower, passage_chunks, autocast)
    end_state = _rng_state()

    loss = dpr_nll_loss(questions.requires_grad_(), passages.requires_grad_())
    scale(loss).backward()

    _backward_chunks(question_tower, question_chunks, question_states, questions.grad, autocast)
    _backward_chunks(passage_tower, passage_chunks, passage_states, passages.grad, autocast)
    _set_rng_state(end_state)  # where the first pass left it, as a single pass would
    return loss.detach()


def _encode_without_graph(tower, chunks: list[Batch], autocast) -> tuple[torch.Tensor, list[tuple]]:
    """Every chunk's vectors written, in fp32, straight into one batch tensor (one copy each,
    the cast included; no per-chunk fp32 copy and no concatenation after)."""
    rows = [len(chunk["input_ids"]) for chunk in chunks]
    vectors, states, start = None, [], 0
    with torch.no_grad():
        for chunk, count in zip(chunks, rows):
            states.append(_rng_state())
            with autocast():
                chunk_vectors = tower(**chunk)
            if vectors is None:
                vectors = torch.empty(sum(rows), chunk_vectors.shape[1], dtype=torch.float32, device=chunk_vectors.device)
            vectors[start : start + count] = chunk_vectors
            start += count
    return vectors, states


def _backward_chunks(tower, chunks: list[Batch], states: list[tuple], gradient: torch.Tensor, autocast) -> None:
    """Backpropagate each chunk's cached gradient through its re-encoding: `vectors.backward
    (gradient)` is the gradient of the surrogate <vectors, gradient>, without forming it (the
    cast to the vectors' format is what the fp32 product's backward would have done)."""
    start = 0
    for chunk, state in zip(chunks, states):
        rows = len(chunk["input_ids"])
        _set_rng_state(state)  # the dropout masks of this chunk's first pass
        with autocast():
            vectors = tower(**chunk)
        vectors.backward(gradient[start : start + rows].to(vectors.dtype))
        start += rows


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)

