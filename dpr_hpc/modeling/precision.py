"""Mixed precision: which number format a stage computes in, and the autocast that applies it.

`auto` takes bf16 where the hardware computes it natively (GPUs of compute capability 8.0 and up;
CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older GPUs, and fp32 elsewhere.
On a CPU without native bf16, PyTorch emulates it: measured on this project's 2-core AMD EPYC
(AVX2 only), a bf16 autocast forward pass of a 6-layer BERT was 6.5x slower than fp32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """The format `requested` means on `device`; an explicit choice is taken as it is."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_cpu_bf16() else "fp32"


def native_cpu_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Matrix multiplies in `precision`, reductions and the loss in fp32 (torch.autocast's lists)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
