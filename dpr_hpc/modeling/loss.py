"""DPR's training objective (paper eq. 2) over in-batch and hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpr_nll_loss(questions: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each question's positive among all passages in the batch.

    `passages` holds the B positives first (row i belongs to question i), then the negatives,
    so every other question's positive and every hard negative competes with the gold one.
    """
    scores = questions.float() @ passages.float().T
    targets = torch.arange(questions.shape[0], device=questions.device)
    return F.cross_entropy(scores, targets)
