"""The stage job entry point sizes its thread pools to the job's SLURM allocation."""

from __future__ import annotations

import faiss
import torch

from dpr_hpc.stages.runner import fit_threads_to_allocation


def test_threads_follow_slurm_cpus_per_task(monkeypatch):
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    try:
        assert fit_threads_to_allocation() == 1
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def test_threads_are_left_alone_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    before = torch.get_num_threads()
    assert fit_threads_to_allocation() is None
    assert torch.get_num_threads() == before
