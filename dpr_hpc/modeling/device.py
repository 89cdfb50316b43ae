"""The device a stage or benchmark runs on, and its memory: one owner, so the stages, the batch
size probe and the benchmark tools pick, synchronize and free it the same way."""

from __future__ import annotations

import gc
import resource
import sys

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Give back what the objects just dropped held (a model, token arrays, a failed probe's
    tensors) before the next memory-hungry step, on the GPU too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (each stage job runs in its own) and of the GPU."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_mb": round(rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20, 1)}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak
