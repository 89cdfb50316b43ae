"""`batch_size: auto`: the largest power of 2 whose training step fits, found by trying.

The paper picked each encoder's batch size by hand as the largest power of 2 that fit its GPU
(BERT 16, DistilBERT 64, TinyBERT 128, ELECTRA 64). The probe does the same before training:
a forward and backward pass of both towers on a batch of full-length texts (the worst case the
data can produce), with the AdamW state the real step will hold, doubling until the GPU runs
out of memory or the peak passes (1 - margin) of what was free. Memory is released between
probes, so the training that follows starts from a clean allocator.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dpr_hpc.modeling.device import release_memory

SAFETY_MARGIN = 0.10  # of the memory free before the probe: fragmentation, longer real batches
MAX_BATCH = 4096
CPU_FALLBACK = 16  # no GPU: nothing to probe; the paper's BERT batch size


class OutOfMemory(RuntimeError):
    """A probe that does not fit: CUDA's own out-of-memory error, or a peak above the budget."""


def largest_fitting_power_of_two(try_step: Callable[[int], dict[str, Any] | None], limit: int, log: Callable[[str], None] = print) -> tuple[int, list[dict[str, Any]]]:
    """Try 1, 2, 4, ... up to `limit`; returns the largest size that ran and every probe taken."""
    probes: list[dict[str, Any]] = []
    best, size = 0, 1
    while size <= limit:
        fits, note = _probe(try_step, size)
        probes.append({"batch_size": size, "fits": fits, **note})
        log(f"batch size probe: {size:>5} {'fits' if fits else 'does not fit'}" + (f" ({note['reason']})" if "reason" in note else ""))
        if not fits:
            break
        best, size = size, size * 2
    if best == 0:
        raise OutOfMemory("batch size 1 does not fit: the model alone needs more memory than the GPU has free")
    return best, probes


def _probe(try_step: Callable[[int], dict[str, Any] | None], size: int) -> tuple[bool, dict[str, Any]]:
    try:
        return True, dict(try_step(size) or {})
    except (torch.OutOfMemoryError, OutOfMemory) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else "out of memory"
        return False, {"reason": reason}
    finally:
        release_memory()  # the failed step's tensors, freed now that the exception is gone


def gpu_step_probe(question_tower, passage_tower, max_length: int, vocab_size: int, device: torch.device,
                   autocast: Callable[[], Any], with_token_types: bool) -> Callable[[int], dict[str, Any]]:
    """A probe step for CUDA: full-length inputs, optimizer-state reservation, fwd + bwd."""
    from dpr_hpc.modeling.loss import dpr_nll_loss

    parameters = [p for tower in (question_tower, passage_tower) for p in tower.parameters()]
    free, _total = torch.cuda.mem_get_info(device)
    budget = (free + torch.cuda.memory_allocated(device)) * (1 - SAFETY_MARGIN)

    def batch(rows: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, max(1001, vocab_size - 1), (rows, max_length), device=device)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_token_types:
            out["token_type_ids"] = torch.zeros_like(ids)
        return out

    def step(size: int) -> dict[str, Any]:
        adam_state = [torch.empty_like(p) for p in parameters for _ in range(2)]  # exp_avg, exp_avg_sq
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with autocast():
                q, p = question_tower(**batch(size)), passage_tower(**batch(2 * size))
            dpr_nll_loss(q.float(), p.float()).backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        finally:
            for parameter in parameters:
                parameter.grad = None
            del adam_state
        if peak > budget:
            raise OutOfMemory(f"peak {peak / 2**30:.1f} GiB above the budget {budget / 2**30:.1f} GiB")
        return {"peak_gb": round(peak / 2**30, 2)}

    return step
