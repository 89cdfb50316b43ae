"""Issue 6's two pieces: gradient caching gives the full batch's gradients, and `batch_size: auto`
finds the largest power of 2 that fits without leaving memory behind."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from conftest import run_folder, train_attempt, train_in_process
from dpr_hpc.modeling.batch_probe import OutOfMemory, largest_fitting_power_of_two
from dpr_hpc.modeling.batching import pad_batch
from dpr_hpc.modeling.encoder import DprEncoder
from dpr_hpc.modeling.grad_cache import grad_cache_backward
from dpr_hpc.modeling.loss import dpr_nll_loss



def _towers(demo, dropout: float) -> tuple[DprEncoder, DprEncoder]:
    folder = str(demo / "models" / "tiny-bert")
    torch.manual_seed(0)
    return DprEncoder.from_pretrained(folder, 48, dropout).train(), DprEncoder.from_pretrained(folder, 48, dropout).train()


def _chunks(rows: int, chunk: int, generator: torch.Generator) -> list[dict]:
    """`rows` random texts of 5 to 40 tokens, padded chunk by chunk as training pads them."""
    texts = [(torch.randint(5, 300, (int(n),), generator=generator).numpy(), None) for n in torch.randint(5, 40, (rows,), generator=generator)]
    return [pad_batch(texts[i : i + chunk], 0, 8) for i in range(0, rows, chunk)]


def _grads(*towers) -> dict[str, torch.Tensor]:
    grads = {f"{t}.{name}": p.grad.clone() for t, tower in enumerate(towers) for name, p in tower.named_parameters() if p.grad is not None}
    for tower in towers:
        tower.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("batch, chunk, seed", [(16, 4, 0), (16, 4, 1), (13, 5, 2), (7, 3, 3), (9, 9, 4)])
def test_gradient_cache_gives_the_full_batch_gradients_with_dropout_on(demo_assets, batch, chunk, seed):
    """Reference: the same chunks encoded with their graphs kept, one loss over the whole
    batch, one backward. Dropout (0.1) draws the same masks only if the cache restores each
    chunk's RNG state. Tolerance: 1e-5 absolute, 1e-4 relative (fp32, different summation order)."""
    questions, passages = _towers(demo_assets, dropout=0.1)
    generator = torch.Generator().manual_seed(seed)
    q_chunks, p_chunks = _chunks(batch, chunk, generator), _chunks(2 * batch, chunk, generator)

    torch.manual_seed(100 + seed)
    q = torch.cat([questions(**c) for c in q_chunks])
    p = torch.cat([passages(**c) for c in p_chunks])
    reference_loss = dpr_nll_loss(q, p)
    reference_loss.backward()
    reference, rng_after_reference = _grads(questions, passages), torch.get_rng_state()

    torch.manual_seed(100 + seed)
    loss = grad_cache_backward(questions, passages, q_chunks, p_chunks)
    cached = _grads(questions, passages)

    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    assert reference.keys() == cached.keys() and len(reference) > 10
    for name in reference:
        assert torch.allclose(cached[name], reference[name], atol=1e-5, rtol=1e-4), name
    assert torch.equal(torch.get_rng_state(), rng_after_reference)


def test_gradient_cache_matches_one_unchunked_forward_without_dropout(demo_assets):
    questions, passages = _towers(demo_assets, dropout=0.0)
    generator = torch.Generator().manual_seed(7)
    q_chunks, p_chunks = _chunks(16, 4, generator), _chunks(32, 4, generator)
    whole = lambda chunks: pad_batch([(row[m.bool()].numpy(), None) for c in chunks for row, m in zip(c["input_ids"], c["attention_mask"])], 0, 8)  # noqa: E731
    dpr_nll_loss(questions(**whole(q_chunks)), passages(**whole(p_chunks))).backward()
    reference = _grads(questions, passages)
    grad_cache_backward(questions, passages, q_chunks, p_chunks)
    cached = _grads(questions, passages)
    for name in reference:
        assert torch.allclose(cached[name], reference[name], atol=1e-5, rtol=1e-4), name


def test_auto_batch_size_is_the_largest_power_of_two_that_fits_and_frees_every_probe():
    alive: list[weakref.ref] = []

    def step(size: int) -> dict:
        activations = torch.empty(size, 1000)  # what a real step holds when it runs out
        alive.append(weakref.ref(activations))
        if size > 24:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} MiB")
        return {"peak_gb": size / 1000}

    logged: list[str] = []
    size, probes = largest_fitting_power_of_two(step, limit=4096, log=logged.append)
    assert size == 16
    assert [(p["batch_size"], p["fits"]) for p in probes] == [(1, True), (2, True), (4, True), (8, True), (16, True), (32, False)]
    assert "out of memory" in probes[-1]["reason"].lower() and len(logged) == 6
    gc.collect()
    assert all(ref() is None for ref in alive)  # nothing of any probe is left allocated


def test_auto_batch_size_stops_at_the_limit_and_fails_clearly_when_nothing_fits():
    assert largest_fitting_power_of_two(lambda size: None, limit=100, log=lambda _: None)[0] == 64

    def never(size: int) -> None:
        raise OutOfMemory("peak 30.0 GiB above the budget 21.6 GiB")

    with pytest.raises(OutOfMemory, match="batch size 1 does not fit"):
        largest_fitting_power_of_two(never, limit=100, log=lambda _: None)


@pytest.mark.slow
def test_demo_cell_trains_with_the_gradient_cache_and_records_it(demo_assets, tmp_path):
    layout, cell_id = run_folder(tmp_path, demo_assets, "gradcache", extra="    grad_cache: {chunk_size: 4}\n")
    output = train_in_process(layout, cell_id)
    assert output.details["grad_cache"] == {"chunk_size": 4} and output.details["batch_size"] == 16
    losses = json.loads(train_attempt(layout, cell_id).losses.read_text())["epoch_losses"]
    assert losses[-1] < losses[0]
