"""`dpr-hpc bench --compile`: the encoders eager and compiled (torch.compile, inductor), side by
side in one run on the bench's 6-layer, 384-wide BERT, through the stages' own code (encode,
backward_batch, clip_and_step, compute.compile_encoders). It measures what `compute.compile:
auto` weighs: each compile's time and the time it saves per batch, and so the work from which
compiling pays (README, *Compute*).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import numpy as np

from dpr_hpc.bench.stages import OUR_ENCODE_BATCH, TRAIN_BATCH, BenchSize, _bert_encoder, _sync, nq_like_texts


def bench_compile(device, precision: str, size: BenchSize, rng: np.random.Generator, echo: Callable[[str], None]) -> dict[str, Any]:
    passages = nq_like_texts(rng, size.passages, mean=140, sd=45, low=24, high=256)
    result = {"encode": _encode(passages, device, precision, size.repeats, echo), "train": _train(device, precision, size, rng, echo)}
    return result


def _compiled(encoders: list, warm_up: Callable[[], None]) -> float:
    """Compile `encoders` as the stages do (compute.compile: true) and return the compile's seconds."""
    from dpr_hpc.modeling.compute import compile_encoders

    return compile_encoders(encoders, True, 0.0, 1, warm_up, log=lambda line: None).compile_s


def _encode(passages, device, precision: str, repeats: int, echo) -> dict[str, Any]:
    from dpr_hpc.modeling.encoding import encode, warm_up

    eager = _bert_encoder(device)
    compiled = copy.deepcopy(eager)
    compile_s = _compiled([compiled], lambda: warm_up(compiled, passages, 0, device, precision))
    n = len(passages)
    eager_s, compiled_s, differences = [], [], []
    for _ in range(repeats):  # interleaved, so drifts in clock speed (and other load) hit both alike
        ours, fused = encode(eager, passages, 0, OUR_ENCODE_BATCH, device, precision), encode(compiled, passages, 0, OUR_ENCODE_BATCH, device, precision)
        eager_s.append(ours.encode_s)
        compiled_s.append(fused.encode_s)
        differences.append(float(np.abs(ours.embeddings - fused.embeddings).max()))
    t_eager, t_compiled = statistics.median(eager_s), statistics.median(compiled_s)
    saved_per_passage = (t_eager - t_compiled) / n
    result = {"passages": n, "compile_s": compile_s, "eager_per_s": n / t_eager, "compiled_per_s": n / t_compiled, "speedup": t_eager / t_compiled,
              "eager_s": eager_s, "compiled_s": compiled_s, "max_abs_difference": max(differences),
              "break_even_passages": compile_s / saved_per_passage if saved_per_passage > 0 else None}
    echo(f"compiled encoding ({precision}): compile {compile_s:.1f}s; eager {result['eager_per_s']:.1f}/s, compiled {result['compiled_per_s']:.1f}/s "
         f"-> {result['speedup']:.2f}x; repays its compile after {_count(result['break_even_passages'])} passages; "
         f"vectors differ by at most {result['max_abs_difference']:.2g}")
    return result


def _train(device, precision: str, size: BenchSize, rng, echo) -> dict[str, Any]:
    import torch

    from dpr_hpc.grid.config import TrainConfig
    from dpr_hpc.modeling.batching import pad_batch, rows_of, to_device
    from dpr_hpc.modeling.compute import adamw
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE
    from dpr_hpc.modeling.train_step import backward_batch, clip_and_step

    steps = size.train_steps
    questions = nq_like_texts(rng, TRAIN_BATCH * (steps + 1), mean=12, sd=4, low=6, high=34)
    passages = nq_like_texts(rng, 2 * TRAIN_BATCH * (steps + 1), mean=140, sd=45, low=24, high=256)

    def step_batches(step: int) -> tuple[list, list]:
        q_rows, p_rows = range(step * TRAIN_BATCH, (step + 1) * TRAIN_BATCH), range(step * 2 * TRAIN_BATCH, (step + 1) * 2 * TRAIN_BATCH)
        return ([to_device(pad_batch(rows_of(questions, list(q_rows)), 0, PAD_MULTIPLE), device)],
                [to_device(pad_batch(rows_of(passages, list(p_rows)), 0, PAD_MULTIPLE), device)])

    def setup(compile_it: bool):
        torch.manual_seed(0)
        towers = [_bert_encoder(device).train(), _bert_encoder(device).train()]
        params = [p for tower in towers for p in tower.parameters()]
        optimizer, _ = adamw(params, 1e-5, TrainConfig.weight_decay, device)
        compile_s = 0.0
        if compile_it:
            def warm_up() -> None:
                backward_batch(*towers, *step_batches(0), False, precision, device, None)
                optimizer.zero_grad(set_to_none=True)
            compile_s = _compiled(towers, warm_up)
        return towers, params, optimizer, compile_s

    runs = {"eager": setup(False), "compiled": setup(True)}
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    for step in range(1, steps + 1):  # interleaved step by step
        for way, (towers, params, optimizer, _) in runs.items():
            _sync(device)
            start = time.perf_counter()
            loss = backward_batch(*towers, *step_batches(step), False, precision, device, None)
            clip_and_step(params, optimizer, None, TrainConfig.max_grad_norm)
            _sync(device)
            seconds[way].append(time.perf_counter() - start)
            losses[way].append(float(loss.detach()))
    t_eager, t_compiled = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
    compile_s = runs["compiled"][3]
    result = {"steps": steps, "batch": TRAIN_BATCH, "compile_s": compile_s, "eager_triples_per_s": TRAIN_BATCH / t_eager,
              "compiled_triples_per_s": TRAIN_BATCH / t_compiled, "speedup": t_eager / t_compiled, "step_s": seconds, "losses": losses,
              "break_even_steps": compile_s / (t_eager - t_compiled) if t_eager > t_compiled else None}
    echo(f"compiled training ({precision}, batch {TRAIN_BATCH}): compile {compile_s:.1f}s; eager {result['eager_triples_per_s']:.2f} triples/s, "
         f"compiled {result['compiled_triples_per_s']:.2f} -> {result['speedup']:.2f}x; repays its compile after "
         f"{_count(result['break_even_steps'])} steps")
    return result


def _count(value: float | None) -> str:
    return "never (no gain)" if value is None else f"{value:,.0f}"
