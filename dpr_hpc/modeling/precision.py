"""Mixed precision: which number format a stage computes in, and the autocast that applies it.

`auto` takes bf16 where the hardware computes it natively (GPUs of compute capability 8.0 and up;
CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older GPUs, and fp32 elsewhere.
It reads the compute capability, not `torch.cuda.is_bf16_supported()`, which by default counts
emulation and says yes on Turing and Volta (Titan RTX, V100, T4), where bf16 runs without tensor
cores, far slower than fp16. On a CPU without native bf16, PyTorch emulates it too: measured on
this project's 2-core AMD EPYC (AVX2 only), a bf16 autocast forward pass of a 6-layer BERT was
6.5x slower than fp32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores compute bf16


def resolve_precision(requested: str, device: torch.device) -> str:
    """The format `requested` means on `device`; an explicit choice is taken as it is."""
    if requested != "auto":
        return requested
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return auto_precision(capability, native_cpu_bf16())


def auto_precision(gpu_capability: tuple[int, int] | None, cpu_native_bf16: bool) -> str:
    """`auto`'s rule: bf16 where the hardware computes it natively, fp16 (with a scaler when
    training) on older GPUs, fp32 on a CPU that would only emulate bf16."""
    if gpu_capability is not None:
        return "bf16" if tuple(gpu_capability) >= NATIVE_BF16_CAPABILITY else "fp16"
    return "bf16" if cpu_native_bf16 else "fp32"


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
