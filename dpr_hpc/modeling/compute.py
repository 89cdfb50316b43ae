"""How the encoders compute: torch.compile (inductor) where it repays its compile time, the
attention kernel that ran, and the optimiser's implementation. None of these changes a result
beyond float rounding (tests/test_compile.py pins it), so none is part of a stage key; every
record says which ran (`details.compute`).

Dynamic padding: every batch is padded to its own longest text, so the sequence length (and
the last batch's size) changes from batch to batch. The inputs' batch and sequence dimensions
are marked dynamic, so one graph serves every length. Bucketing lengths to 64/128/192/256 was
measured against it on the bench's 6-layer BERT (one thread, CPU time, bf16): it padded 13%
more tokens, compiled once per bucket, and gained 1.08x over eager where dynamic gained 1.24x.

Dropout: inductor's own random numbers would draw other masks than eager PyTorch, so a
compiled training would neither match an eager one nor let the gradient cache replay a
chunk's masks from a restored RNG state. `fallback_random` keeps PyTorch's generator.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

COMPILE_OPTIONS = {"fallback_random": True}
# `auto`'s rule, from `dpr-hpc bench --compile` on a 2-core Sapphire Rapids (README, *Compute*):
# a compile takes tens of seconds per graph (a 6-layer, 384-wide BERT's forward: 44 s on a quiet
# machine), and compiled encoding took ~20% less time than eager (1.24x). Compile only where the
# expected saving is twice the expected cost: ~10 minutes of eager work per graph.
COMPILE_S_PER_GRAPH = 60.0
COMPILE_GAIN = 0.2
# Training: the one run on a busy machine (2 timed steps) measured no gain (0.97x after a 190 s
# compile), so `auto` does not compile a training until a quiet `bench --compile` shows one.
TRAIN_COMPILE_GAIN = 0.0
REPAY_MARGIN = 2.0
# Eager FLOP rates at the high end of what the stages reach, so that the eager time (and with it
# the saving) errs low: encoding reached 342 GFLOP/s on the 2-core Sapphire Rapids (bf16, AMX);
# a data-centre GPU reaches ~200 TFLOP/s.
EAGER_FLOPS_PER_S = {"cpu": 3.5e11, "cuda": 2e14}


class CompileError(RuntimeError):
    """`compute.compile: true` and the compile failed (no C compiler, an unsupported op, ...)."""


@dataclass
class CompileReport:
    """What the record says of the compile: what was asked, whether it ran compiled, why."""

    requested: bool | str
    compiled: bool
    reason: str
    compile_s: float = 0.0
    expected_eager_s: float | None = None
    dynamic: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encoder_flops_per_token(encoder: torch.nn.Module) -> float:
    """Forward multiply-add FLOPs per token: twice the weights a token passes through (every
    weight but the embedding tables, which are looked up, not multiplied). Leaves out the
    attention products, so it errs low, towards not compiling."""
    embedded = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Embedding))
    return 2.0 * (sum(p.numel() for p in encoder.parameters()) - embedded)


def expected_eager_s(forward_flops: float, device: torch.device) -> float:
    return forward_flops / EAGER_FLOPS_PER_S.get(device.type, EAGER_FLOPS_PER_S["cpu"])


def compile_decision(requested: bool | str, eager_s: float, graphs: int, gain: float = COMPILE_GAIN) -> tuple[bool, str]:
    """Whether to compile, and why. `eager_s`: the stage's expected eager compute time;
    `graphs`: how many graphs it compiles (a training's forward and backward, the gradient
    cache's no-grad forward)."""
    if requested is False:
        return False, "compute.compile: false"
    if requested is True:
        return True, "compute.compile: true"
    cost = COMPILE_S_PER_GRAPH * graphs
    saved = gain * eager_s
    if saved >= REPAY_MARGIN * cost:
        return True, f"auto: ~{saved:.0f}s saved of ~{eager_s:.0f}s eager repays ~{cost:.0f}s of compiling"
    return False, f"auto: ~{saved:.0f}s saved of ~{eager_s:.0f}s eager would not repay ~{cost:.0f}s of compiling"


def compile_encoders(encoders: list[torch.nn.Module], requested: bool | str, eager_s: float, graphs: int,
                     warm_up: Callable[[], None], log: Callable[[str], None] = print, gain: float = COMPILE_GAIN) -> CompileReport:
    """Compile each encoder's backbone if the decision says so, then run `warm_up()` (which
    must call every graph the stage will use, so the compile happens here, timed apart from
    the stage's work). A failed compile raises CompileError under `true`; under `auto` the
    encoders go back to eager and the report says why."""
    compile_now, reason = compile_decision(requested, eager_s, graphs, gain)
    report = CompileReport(requested, False, reason, expected_eager_s=round(eager_s, 1))
    if not compile_now:
        return report
    log(f"compiling the encoders ({reason})")
    began = time.perf_counter()
    try:
        for encoder in encoders:
            encoder.compile_backbone(COMPILE_OPTIONS)
        warm_up()
    except Exception as exc:  # inductor raises many types: a missing compiler, an unsupported op
        for encoder in encoders:
            encoder.uncompile_backbone()
        torch._dynamo.reset()
        problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        if requested is True:
            raise CompileError(f"compute.compile: true, but torch.compile failed ({problem}); "
                               "set compute.compile to auto or false to run eager") from exc
        report.reason = f"auto: compile failed, ran eager ({problem})"
        log(f"warning: {report.reason}")
        return report
    report.compiled, report.compile_s = True, round(time.perf_counter() - began, 2)
    report.dynamic = "batch and sequence dimensions marked dynamic"
    log(f"compiled in {report.compile_s:.1f}s")
    return report


def attention_implementation(encoder: torch.nn.Module) -> str:
    """The attention kernel the backbone runs, as transformers resolved it at load ('sdpa':
    PyTorch's scaled-dot-product attention, transformers' default where the model supports it)."""
    return str(getattr(encoder.backbone.config, "_attn_implementation", None) or "eager")


def adamw(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device) -> tuple[torch.optim.AdamW, str]:
    """AdamW with its fused kernel (one kernel for every parameter's update) where PyTorch has
    it for the device, else the foreach one; returns the optimiser and which it is. Both give
    the for-loop AdamW's updates up to float rounding, and their state dicts are the same."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, eps=1e-8, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(parameters, lr=lr, eps=1e-8, weight_decay=weight_decay, foreach=True), "foreach"
