"""`dpr-hpc gpu-check`: the paper's GPU figures at real model sizes, on whatever GPU this is,
with its memory capped at the paper's 24 GB (a Titan RTX) so a larger card stands in for it.

No download: the four encoders are randomly initialised with the real shapes of
bert-base-uncased, distilbert-base-uncased, google/electra-small-discriminator and
huawei-noah/TinyBERT_General_4L_312D (weights do not change speed or memory), on random token
ids with NQ-like lengths. Every figure comes from the stages' own code:

(a) the batch size `batch_size: auto` picks for each encoder at max_length 256 (the train
    stage's probe), next to the paper's Table 1;
(b) bert-base at batch 128 with the gradient cache against the largest plain batch: peak GPU
    memory and step time (the train stage's step);
(c) PEI's encoding for bert-base over the 935,159-passage pool, the paper's way (every text
    padded to 256, fp32, batch 512, input order) and ours (length-sorted, per-batch padding,
    precision `auto`), each timed on a fixed sample and extrapolated, and flagged so;
(d) TTT per epoch of 58,880 questions and for 40 epochs, extrapolated from timed steps, next to
    the paper's 14 h 42 min;
(e) how close (c) and (d) come to the card: our encode and train FLOP rates against the GPU's
    tensor-core peak for the precision that ran (the vendor's dense figure from PEAK_TFLOPS, or,
    for a card not in it, the matrix-multiply peak measured in this run), and a profiled run of
    each that says where the time goes (matmul kernels against softmax, GELU, LayerNorm, the
    optimiser, the GPU idle), as `dpr-hpc bench` does on a CPU.

`--smoke` runs the same code on tiny shapes on the CPU in seconds: the test suite runs it, so
the script cannot rot while no GPU is at hand; its fractions are of the CPU's matrix-multiply
peak measured in the run. `--budget-s` skips what would not fit.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dpr_hpc.bench.stages import encoder_flops, spread
from dpr_hpc.errors import UsageError

NQ_TRAIN_QUESTIONS = 58_880
NQ_POOL = 935_159
PAPER_CARD_BYTES = 24 * 2**30  # the paper's Titan RTX
MAX_LENGTH = 256
PAPER_EPOCHS = 40
PAPER_PAD, PAPER_ENCODE_BATCH, PAPER_PRECISION = 256, 512, "fp32"
OUR_ENCODE_BATCH = 512  # the grid's default encode_batch_size
GRAD_CACHE_BATCH = 128  # DPR's own batch size, which the paper could not fit
# Table 2 of the paper, BERT at its standard embedding size 768, on one Titan RTX.
PAPER_TTT_BERT_S = 14 * 3600 + 42 * 60
PAPER_PEI_BERT_S = 2 * 3600 + 40 * 60
# NQ-like token lengths ([CLS] ... [SEP]): passages of ~100 words, questions of 9-10 words.
PASSAGE_LENGTHS = {"mean": 140, "sd": 45, "low": 24, "high": MAX_LENGTH}
QUESTION_LENGTHS = {"mean": 12, "sd": 4, "low": 6, "high": 34}


@dataclass(frozen=True)
class EncoderShape:
    """One encoder family's real dimensions (its hub config's), and the paper's batch size for it."""

    family: str  # bert, distilbert or electra: the transformers config class
    fields: dict[str, int]
    paper_batch: int


VOCAB = 30522  # every one of the four uses BERT's uncased WordPiece vocabulary
SHAPES: dict[str, EncoderShape] = {
    "bert-base-uncased": EncoderShape("bert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}, 16),
    "distilbert-base-uncased": EncoderShape("distilbert", {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}, 64),
    "google/electra-small-discriminator": EncoderShape(
        "electra", {"embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12, "num_attention_heads": 4, "intermediate_size": 1024}, 64),
    "huawei-noah/TinyBERT_General_4L_312D": EncoderShape(
        "bert", {"hidden_size": 312, "num_hidden_layers": 4, "num_attention_heads": 12, "intermediate_size": 1200}, 128),
}
# --smoke: the same families a few units wide, so the CPU runs every measurement in seconds.
SMOKE_FIELDS = {"hidden_size": 32, "dim": 32, "num_hidden_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_heads": 4,
                "intermediate_size": 64, "hidden_dim": 64, "embedding_size": 16}
SMOKE_SHAPES = {name: EncoderShape(s.family, {key: SMOKE_FIELDS[key] for key in s.fields}, s.paper_batch) for name, s in SHAPES.items()}
BASE = "bert-base-uncased"


# Dense (no 2:4 sparsity) peak TFLOP/s per precision, from the vendor's datasheet or architecture
# whitepaper; where a datasheet gives only the sparse figure (marked *), it is halved, as its
# footnote says ("specifications 1/2 lower without sparsity"). fp32 is the plain CUDA-core
# figure: PyTorch runs fp32 matmuls without TF32 unless asked (allow_tf32 is off by default),
# so the paper's fp32 runs are held to it. GeForce cards: tensor cores at fp32 accumulate (what
# PyTorch's autocast uses), which on them is half the fp16-accumulate rate. First match wins,
# so a variant (PCIe, NVL) precedes its family's SXM figures.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float], str], ...] = (
    (r"h100.*nvl", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, "NVIDIA H100 datasheet (H100 NVL column, *halved)"),
    (r"h100.*pcie", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}, "NVIDIA H100 datasheet (H100 PCIe column, *halved)"),
    (r"h100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, "NVIDIA H100 datasheet (H100 SXM column, *halved)"),
    (r"h200.*nvl", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, "NVIDIA H200 datasheet (H200 NVL column, *halved)"),
    (r"h200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, "NVIDIA H200 datasheet (H200 SXM column, *halved)"),
    (r"a100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, "NVIDIA A100 datasheet (dense figures; 40 and 80 GB alike)"),
    (r"l40s", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}, "NVIDIA L40S datasheet (*halved: 366 TF32, 733 BF16/FP16 sparse)"),
    (r"\bl4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}, "NVIDIA L4 datasheet (*halved)"),
    (r"\ba40\b", {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7}, "NVIDIA A40 datasheet (*halved)"),
    (r"\ba10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}, "NVIDIA A10 datasheet (*halved)"),
    (r"a6000", {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8, "fp16": 154.8}, "NVIDIA RTX A6000 datasheet (*halved)"),
    (r"v100.*pcie", {"fp32": 14.0, "fp16": 112.0}, "NVIDIA V100 datasheet (PCIe column; no bf16 tensor cores)"),
    (r"v100", {"fp32": 15.7, "fp16": 125.0}, "NVIDIA V100 datasheet (SXM2 column; no bf16 tensor cores)"),
    (r"\bt4\b", {"fp32": 8.1, "fp16": 65.0}, "NVIDIA T4 datasheet (mixed precision fp16/fp32; no bf16 tensor cores)"),
    (r"titan rtx", {"fp32": 16.3, "fp16": 130.5}, "NVIDIA Turing architecture whitepaper, Titan RTX (fp16 tensor, fp32 accumulate)"),
    (r"4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}, "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 (fp32 accumulate, dense)"),
    (r"3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}, "NVIDIA Ampere GA102 architecture whitepaper, RTX 3090 (fp32 accumulate, dense)"),
)


def datasheet_peak(gpu_name: str, precision: str) -> tuple[float, str] | None:
    """The card's dense peak GFLOP/s for `precision`, and where the figure comes from; None for
    a card (or a precision on it) the table does not know."""
    for pattern, peaks, source in PEAK_TFLOPS:
        if re.search(pattern, gpu_name.lower()):
            return (peaks[precision] * 1000, source) if precision in peaks else None
    return None


@dataclass(frozen=True)
class CheckSize:
    encode_sample: int  # pool passages each way of encoding is timed on
    train_steps: int  # timed steps per training measurement (one more runs untimed first)
    probe_limit: int  # the largest batch the probe tries
    grad_cache_batch: int
    grad_cache_chunk: int
    max_length: int


GPU = CheckSize(encode_sample=16_384, train_steps=5, probe_limit=4096, grad_cache_batch=GRAD_CACHE_BATCH, grad_cache_chunk=32, max_length=MAX_LENGTH)
SMOKE = CheckSize(encode_sample=64, train_steps=1, probe_limit=4, grad_cache_batch=8, grad_cache_chunk=4, max_length=64)


@dataclass
class Budget:
    """Seconds left for the check: a measurement that starts after it ran out is skipped, and
    the report says so, rather than the whole run being killed with nothing written."""

    seconds: float
    began: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.began)

    def run(self, name: str, measure: Callable[[], dict[str, Any]], echo: Callable[[str], None]) -> dict[str, Any]:
        if self.left() <= 0:
            echo(f"{name}: skipped, the --budget-s ran out")
            return {"skipped": f"--budget-s {self.seconds:.0f} ran out before it started"}
        return measure()


def run_gpu_check(smoke: bool = False, budget_s: float = 480.0, echo: Callable[[str], None] = print, seed: int = 0) -> dict[str, Any]:
    import torch

    from dpr_hpc.modeling.precision import resolve_precision
    from dpr_hpc.provenance import node_tags, now_iso
    from dpr_hpc.modeling.device import pick_device

    device = pick_device()
    if device.type != "cuda" and not smoke:
        raise UsageError("gpu-check: no CUDA GPU here; it measures a GPU (--smoke runs it on tiny shapes on the CPU, measuring nothing)")
    shapes, size = (SMOKE_SHAPES, SMOKE) if smoke else (SHAPES, GPU)
    budget = Budget(budget_s)
    torch.manual_seed(seed)
    report: dict[str, Any] = {"started_at": now_iso(), "node": node_tags(), "device": device.type, "smoke": smoke,
                              "size": size.__dict__, "memory_cap": cap_gpu_memory(device), "precision": resolve_precision("auto", device),
                              "paper": {"ttt_s": PAPER_TTT_BERT_S, "pei_s": PAPER_PEI_BERT_S, "gpu": "Titan RTX 24 GB"}}
    echo(f"gpu-check on {report['node'].get('gpu_name') or report['node'].get('cpu_model')} ({device.type}"
         f"{', smoke: tiny shapes' if smoke else ''}); precision auto = {report['precision']}; memory cap {report['memory_cap']}")
    rng = np.random.default_rng(seed)
    report["batch_size_auto"] = {name: budget.run(f"batch size probe {name}", lambda n=name, s=shape: probe_batch_size(n, s, size, device, report["precision"], echo), echo)
                                 for name, shape in shapes.items()}
    largest_plain = report["batch_size_auto"][BASE].get("batch_size_as_paper_card") or shapes[BASE].paper_batch
    report["grad_cache"] = budget.run("gradient cache", lambda: grad_cache_vs_plain(shapes[BASE], size, largest_plain, device, report["precision"], rng, echo), echo)
    report["pei"] = budget.run("PEI encoding", lambda: pei_encoding(shapes[BASE], size, device, report["precision"], rng, echo), echo)
    report["ttt"] = budget.run("TTT", lambda: ttt_per_epoch(shapes[BASE], size, device, report["precision"], rng, echo), echo)
    report["fraction_of_peak"] = budget.run(
        "fraction of peak", lambda: fraction_of_peak(report, shapes[BASE], size, device, report["precision"], rng, echo), echo)
    report["finished_at"] = now_iso()
    return report


def cap_gpu_memory(device) -> dict[str, Any] | None:
    """Limit this process to the paper's 24 GB, so a bigger card answers as a Titan RTX would
    (the probe then meets CUDA's out-of-memory error at 24 GB, as on that card)."""
    import torch

    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, PAPER_CARD_BYTES / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"fraction": fraction, "cap_gb": round(fraction * total / 2**30, 2), "card_gb": round(total / 2**30, 2)}


def build_tower(shape: EncoderShape, device, seed: int = 0):
    """A randomly initialised tower of the family's real shape, in training mode."""
    import torch
    from transformers import AutoModel, BertConfig, DistilBertConfig, ElectraConfig

    from dpr_hpc.modeling.encoder import DprEncoder, native_size

    config_class = {"bert": BertConfig, "distilbert": DistilBertConfig, "electra": ElectraConfig}[shape.family]
    config = config_class(vocab_size=VOCAB, max_position_embeddings=512, **shape.fields)
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(config)
    return DprEncoder(backbone, native_size(backbone.config)).to(device).train()


def _has_token_types(shape: EncoderShape) -> bool:
    return shape.family != "distilbert"


def probe_batch_size(name: str, shape: EncoderShape, size: CheckSize, device, precision: str, echo) -> dict[str, Any]:
    """The train stage's `batch_size: auto` probe on two fresh towers. It judges a batch by
    CUDA's out-of-memory error (at the 24 GB cap) and by a peak within (1 - margin) of the free
    memory it sees, which on a bigger card is more than 24 GB: the pick as on the paper's card
    is therefore also given, the largest probe whose peak is within (1 - margin) of 24 GB."""
    from dpr_hpc.modeling.batch_probe import SAFETY_MARGIN, largest_fitting_power_of_two
    from dpr_hpc.modeling.device import release_memory

    towers = build_tower(shape, device), build_tower(shape, device, seed=1)
    probe = _probe_step(towers, shape, size, device, precision)
    picked, probes = largest_fitting_power_of_two(probe, size.probe_limit, log=lambda line: None)
    as_card = max((p["batch_size"] for p in probes if p["fits"] and p.get("peak_gb", 0) * 2**30 <= (1 - SAFETY_MARGIN) * PAPER_CARD_BYTES), default=None)
    del towers
    release_memory()
    echo(f"batch size auto, {name} at max_length {size.max_length}: probe picks {picked}, as on a 24 GB card {as_card}; the paper used {shape.paper_batch}")
    return {"batch_size": picked, "batch_size_as_paper_card": as_card, "paper_batch": shape.paper_batch, "probes": probes,
            "max_length": size.max_length, "precision": precision}


def _probe_step(towers, shape: EncoderShape, size: CheckSize, device, precision: str):
    """gpu_step_probe on a GPU; on the CPU (smoke) the same forward and backward on full-length
    random inputs, without a memory reading, so the doubling logic still runs."""
    from dpr_hpc.modeling.batch_probe import gpu_step_probe
    from dpr_hpc.modeling.loss import dpr_nll_loss
    from dpr_hpc.modeling.precision import autocast

    if device.type == "cuda":
        return gpu_step_probe(*towers, size.max_length, VOCAB, device, lambda: autocast(precision, device), _has_token_types(shape))
    import torch

    def cpu_step(rows: int) -> dict[str, Any]:
        def batch(n: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(1000, VOCAB - 1, (n, size.max_length))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with autocast(precision, device):
            q, p = towers[0](**batch(rows)), towers[1](**batch(2 * rows))
        dpr_nll_loss(q.float(), p.float()).backward()
        for tower in towers:
            tower.zero_grad(set_to_none=True)
        return {}
    return cpu_step


def grad_cache_vs_plain(shape: EncoderShape, size: CheckSize, plain_batch: int, device, precision: str, rng, echo) -> dict[str, Any]:
    """Peak GPU memory and step time: the gradient cache at DPR's batch 128 (chunks of
    `grad_cache_chunk`), against one plain step at the largest batch that fits the 24 GB card."""
    cached = time_train_steps(shape, size, size.grad_cache_batch, size.grad_cache_chunk, device, precision, rng)
    plain = time_train_steps(shape, size, plain_batch, 0, device, precision, rng)
    echo(f"bert-base, batch {size.grad_cache_batch} with the gradient cache (chunks of {size.grad_cache_chunk}): {cached['step_s']:.3f} s/step, "
         f"peak {cached['peak_gpu_gb']} GB; plain batch {plain_batch}: {plain['step_s']:.3f} s/step, peak {plain['peak_gpu_gb']} GB")
    return {"grad_cache": cached, "plain": plain,
            "time_per_question_ratio": (cached["step_s"] / cached["batch"]) / (plain["step_s"] / plain["batch"])}


def time_train_steps(shape: EncoderShape, size: CheckSize, batch: int, chunk: int, device, precision: str, rng,
                     pad_to: int | None = None, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """The train stage's step (backward_batch, clip_and_step) on two towers with AdamW: the
    median of `train_steps` timed steps after one untimed, the peak GPU memory, and the
    step's FLOPs (3x its forward pass: the backward computes twice the forward's). With
    `profile`, the timed steps run under the profiler and its breakdown goes into it."""
    import contextlib

    import torch

    from dpr_hpc.bench.stages import nq_like_texts, optimiser_label, profiling
    from dpr_hpc.grid.config import TrainConfig
    from dpr_hpc.modeling.device import release_memory
    from dpr_hpc.modeling.batching import rows_of
    from dpr_hpc.modeling.precision import grad_scaler
    from dpr_hpc.modeling.train_step import backward_batch, clip_and_step
    from dpr_hpc.modeling.device import synchronize

    towers = build_tower(shape, device), build_tower(shape, device, seed=1)
    parameters = [p for tower in towers for p in tower.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    scaler = grad_scaler(precision, device)
    questions = nq_like_texts(rng, batch, **_capped(QUESTION_LENGTHS, size.max_length))
    passages = nq_like_texts(rng, 2 * batch, **_capped(PASSAGE_LENGTHS, size.max_length))  # positives, then hard negatives
    question_chunks = padded_chunks(rows_of(questions, range(batch)), chunk, device, pad_to)
    passage_chunks = padded_chunks(rows_of(passages, range(2 * batch)), chunk, device, pad_to)
    forward_flops = sum(encoder_flops([tuple(c["input_ids"].shape) for c in chunks], *model_dims(shape)) for chunks in (question_chunks, passage_chunks))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []

    def step() -> float:
        synchronize(device)
        began = time.perf_counter()
        backward_batch(*towers, question_chunks, passage_chunks, bool(chunk), precision, device, scaler)
        with optimiser_label():
            clip_and_step(parameters, optimizer, scaler, TrainConfig.max_grad_norm)
        synchronize(device)
        return time.perf_counter() - began

    step()  # warms up, untimed
    with profiling(device, profile) if profile is not None else contextlib.nullcontext():
        times = [step() for _ in range(size.train_steps)]
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    del towers, optimizer, parameters
    release_memory()
    return {"batch": batch, "chunk": chunk or None, "step_s": statistics.median(times), "steps_timed": len(times),
            "step_s_spread": spread(times), "step_flops": 3 * forward_flops,
            "peak_gpu_gb": peak, "precision": precision, "pad_to": pad_to}


def padded_chunks(sequences, chunk: int, device, pad_to: int | None) -> list[dict]:
    """Chunks of `chunk` rows (0: one, the whole batch), each padded as the train stage pads
    (its longest sequence, to a multiple of 8), or to `pad_to` tokens as the paper did."""
    from dpr_hpc.modeling.batching import pad_batch, to_device
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE

    rows = chunk or len(sequences)
    return [to_device(pad_batch(sequences[i : i + rows], 0, PAD_MULTIPLE, pad_to), device) for i in range(0, len(sequences), rows)]


def _capped(lengths: dict[str, int], max_length: int) -> dict[str, int]:
    return {key: min(value, max_length) for key, value in lengths.items()}


def pei_encoding(shape: EncoderShape, size: CheckSize, device, precision: str, rng, echo) -> dict[str, Any]:
    """Encoding time of the pool, the paper's way and ours, each timed on the same sample of
    `encode_sample` passages and extrapolated linearly to the 935,159 of NQ's dev pool."""
    from dpr_hpc.bench.stages import encode_batch_shapes, nq_like_texts
    from dpr_hpc.modeling.device import release_memory
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE, encode

    encoder = build_tower(shape, device)
    passages = nq_like_texts(rng, size.encode_sample, **_capped(PASSAGE_LENGTHS, size.max_length))
    pad_to = min(PAPER_PAD, size.max_length)
    paper = encode(encoder, passages, 0, PAPER_ENCODE_BATCH, device, PAPER_PRECISION, sort=False, pad_to=pad_to)
    ours = encode(encoder, passages, 0, OUR_ENCODE_BATCH, device, precision)
    del encoder
    release_memory()
    factor = NQ_POOL / size.encode_sample
    dims = model_dims(shape)
    result = {"sample": size.encode_sample, "factor": factor, "extrapolated": True,
              "paper_way": {"sample_s": paper.encode_s, "pool_s": paper.encode_s * factor, "batch": PAPER_ENCODE_BATCH, "precision": PAPER_PRECISION, "pad_to": PAPER_PAD,
                            "sample_flops": encoder_flops([(len(passages), pad_to)], *dims)},
              "ours": {"sample_s": ours.encode_s, "pool_s": ours.encode_s * factor, "batch": OUR_ENCODE_BATCH, "precision": precision,
                       "sample_flops": encoder_flops(encode_batch_shapes(passages.lengths, OUR_ENCODE_BATCH, PAD_MULTIPLE), *dims),
                       "passages_per_s": len(passages) / ours.encode_s},
              "note": "encoding only; PEI adds the HNSW build, on the CPU (see `dpr-hpc bench --scale`)"}
    echo(f"encoding the 935,159-passage pool with bert-base (extrapolated x{factor:.1f} from {size.encode_sample:,}): the paper's way "
         f"{result['paper_way']['pool_s'] / 60:.1f} min, ours {result['ours']['pool_s'] / 60:.1f} min; the paper's PEI (incl. index) 2 h 40 min")
    return result


def ttt_per_epoch(shape: EncoderShape, size: CheckSize, device, precision: str, rng, echo) -> dict[str, Any]:
    """Training time per epoch of 58,880 questions at the paper's batch 16 and for its 40
    epochs, the paper's way (padded to 256, fp32) and ours, extrapolated from timed steps."""
    steps_per_epoch = -(-NQ_TRAIN_QUESTIONS // shape.paper_batch)
    ways = {"paper_way": time_train_steps(shape, size, shape.paper_batch, 0, device, PAPER_PRECISION, rng, pad_to=min(PAPER_PAD, size.max_length)),
            "ours": time_train_steps(shape, size, shape.paper_batch, 0, device, precision, rng)}
    result: dict[str, Any] = {"batch": shape.paper_batch, "steps_per_epoch": steps_per_epoch, "epochs": PAPER_EPOCHS, "extrapolated": True}
    for way, timed in ways.items():
        epoch_s = timed["step_s"] * steps_per_epoch
        result[way] = {**timed, "epoch_s": epoch_s, "ttt_s": epoch_s * PAPER_EPOCHS}
    echo(f"TTT, bert-base at batch {shape.paper_batch}, 40 epochs (extrapolated from {size.train_steps} steps): the paper's way "
         f"{result['paper_way']['ttt_s'] / 3600:.1f} h, ours {result['ours']['ttt_s'] / 3600:.1f} h; the paper measured 14 h 42 min")
    return result


def model_dims(shape: EncoderShape) -> tuple[int, int, int]:
    """(hidden, layers, feed-forward width) of a family's config: what encoder_flops counts.
    (ELECTRA's small embedding projection is left out: it is under 1% of its FLOPs.)"""
    f = shape.fields
    if shape.family == "distilbert":
        return f["dim"], f["n_layers"], f["hidden_dim"]
    return f["hidden_size"], f["num_hidden_layers"], f["intermediate_size"]


def card_peak(device, precision: str, echo) -> dict[str, Any]:
    """The peak a FLOP rate is held to: the card's dense datasheet figure for `precision` where
    PEAK_TFLOPS knows the card, else (an unknown card, or the CPU in --smoke) the best
    matrix-multiply rate measured here; the measured one is reported beside it either way."""
    from dpr_hpc.bench.stages import _matmul_peak
    from dpr_hpc.provenance import device_tags

    measured = _matmul_peak(precision, device)
    name = device_tags().get("gpu_name") if device.type == "cuda" else None
    listed = datasheet_peak(name, precision) if name else None
    if listed is not None:
        gflops, source = listed
    else:
        gflops = measured
        source = (f"measured: best {precision} matrix multiply in this run ("
                  + (f"{name} is not in PEAK_TFLOPS)" if name else "the CPU, --smoke)"))
    echo(f"peak {precision}: {_rate(gflops)} ({source}); measured matmul {_rate(measured)}")
    return {"gflops": gflops, "source": source, "measured_matmul_gflops": measured, "precision": precision, "datasheet": listed is not None}


def _rate(gflops: float) -> str:
    return f"{gflops / 1000:.1f} TFLOP/s" if gflops >= 1000 else f"{gflops:.2f} GFLOP/s"


def fraction_of_peak(report: dict[str, Any], shape: EncoderShape, size: CheckSize, device, precision: str, rng, echo) -> dict[str, Any]:
    """Our encode and train FLOP rates (from the PEI and TTT measurements above: bert-base, our
    way) against the card's peak for the precision that ran, the paper's way against the fp32
    peak, and a profiled run of each saying where the time goes."""
    from dpr_hpc.bench.stages import encode_batch_shapes, nq_like_texts, profile_call, profile_words, with_peak
    from dpr_hpc.modeling.device import release_memory
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE, encode

    peaks = {p: card_peak(device, p, echo) for p in dict.fromkeys((precision, PAPER_PRECISION))}
    result: dict[str, Any] = {"peaks": peaks, "precision": precision}
    rates: dict[str, tuple[float, str]] = {}
    pei, ttt = report.get("pei", {}), report.get("ttt", {})
    if "ours" in pei:
        rates["encode"] = (pei["ours"]["sample_flops"] / pei["ours"]["sample_s"], precision)
        rates["encode_paper_way"] = (pei["paper_way"]["sample_flops"] / pei["paper_way"]["sample_s"], PAPER_PRECISION)
    if "ours" in ttt:
        rates["train"] = (ttt["ours"]["step_flops"] / ttt["ours"]["step_s"], precision)
        rates["train_paper_way"] = (ttt["paper_way"]["step_flops"] / ttt["paper_way"]["step_s"], PAPER_PRECISION)
    for name, (flops_per_s, fmt) in rates.items():
        result[name] = {"gflops": flops_per_s / 1e9, "precision": fmt, "fraction_of_peak": flops_per_s / 1e9 / peaks[fmt]["gflops"]}
        echo(f"{name.replace('_', ' ')}: {_rate(flops_per_s / 1e9)} = {result[name]['fraction_of_peak']:.1%} of the {fmt} peak")
    encoder = build_tower(shape, device)
    sample = nq_like_texts(rng, min(size.encode_sample, 4096), **_capped(PASSAGE_LENGTHS, size.max_length))
    encode(encoder, sample, 0, OUR_ENCODE_BATCH, device, precision)  # warm, as the timed run was
    result["encode_profile"] = with_peak(profile_call(lambda: encode(encoder, sample, 0, OUR_ENCODE_BATCH, device, precision), device),
                                         peaks[precision]["gflops"])
    del encoder
    release_memory()
    result["train_profile"] = {}
    time_train_steps(shape, size, shape.paper_batch, 0, device, precision, rng, profile=result["train_profile"])
    result["train_profile"] = with_peak(result["train_profile"], peaks[precision]["gflops"])
    for name in ("encode", "train"):
        echo(profile_words(name, result[f"{name}_profile"], precision))
    result["encode_profile"]["passages"] = len(sample)
    result["note"] = ("FLOPs are counted from the model's shapes (projections, feed-forward, attention products; a training step "
                      "3x its forward); the profiles' matmul rate is the profiler's own count over the mm/addmm/bmm kernels")
    return result
