"""`dpr-hpc bench`: this toolkit's stage code against the paper's way of running, side by side,
in one run on one machine, tagged with the node like every other result.

- encoding throughput (passages/s): ours (length-sorted, padded per batch to a multiple of 8,
  batch 64, precision `auto`) vs the paper's (every text padded to 256, batch 512, fp32), and
  our achieved FLOP rate against this machine's matrix-multiply peak, measured in the same run;
- training throughput (triples/s: a question, its positive, a hard negative): ours (per-batch
  padding, precision `auto`) vs the paper's (padded to 256, fp32), and the time cost of the
  gradient cache on the same batch; all three take the train stage's own step (train_step.py);
- per-query search: our timed path vs a bare FAISS loop on the same index;
- the token cache: tokenizing for a first cell vs for a second cell with the same tokenizer.

The model is a randomly initialised 6-layer, 384-wide BERT (weights do not change the speed)
on NQ-like lengths (passages ~140 tokens, questions ~12), so it needs no download.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

PAPER_PAD, PAPER_ENCODE_BATCH, OUR_ENCODE_BATCH, TRAIN_BATCH = 256, 512, 64, 16


@dataclass(frozen=True)
class BenchSize:
    passages: int
    train_steps: int
    index_vectors: int
    queries: int
    repeats: int


QUICK = BenchSize(passages=128, train_steps=2, index_vectors=5000, queries=300, repeats=1)
FULL_CPU = BenchSize(passages=1024, train_steps=4, index_vectors=20000, queries=1000, repeats=3)
FULL_GPU = BenchSize(passages=32768, train_steps=30, index_vectors=100000, queries=2000, repeats=3)


def run_benchmark(quick: bool = False, echo: Callable[[str], None] = print, seed: int = 0, size: BenchSize | None = None,
                  compile: bool = False) -> dict[str, Any]:
    """`compile`: also the encoders eager against compiled (dpr_hpc.bench.compiled)."""
    import torch

    from dpr_hpc.modeling.precision import resolve_precision
    from dpr_hpc.provenance import node_tags, now_iso
    from dpr_hpc.stages.common import pick_device

    device = pick_device()
    size = size or (QUICK if quick else (FULL_GPU if device.type == "cuda" else FULL_CPU))
    precision = resolve_precision("auto", device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    report: dict[str, Any] = {"node": node_tags(), "started_at": now_iso(), "device": device.type, "precision": precision, "size": size.__dict__}
    echo(f"dpr-hpc bench on {report['node'].get('gpu_name') or report['node'].get('cpu_model')} ({device.type}, "
         f"{torch.get_num_threads()} threads); our precision: {precision}")

    report["matmul_peak_gflops"] = {p: _matmul_peak(p, device) for p in dict.fromkeys(("fp32", precision))}
    echo("matrix-multiply peak: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in report["matmul_peak_gflops"].items()))

    encoder = _bert_encoder(device)
    passages = nq_like_texts(rng, size.passages, mean=140, sd=45, low=24, high=256)
    report["encode"] = _bench_encoding(encoder, passages, device, precision, size.repeats, report["matmul_peak_gflops"], echo)
    report["train"] = _bench_training(device, precision, size, rng, echo)
    if compile:
        from dpr_hpc.bench.compiled import bench_compile

        report["compile"] = bench_compile(device, precision, size, rng, echo)
    report["search"] = _bench_search(size, rng, echo)
    report["token_cache"] = _bench_token_cache(rng, echo)
    report["finished_at"] = now_iso()
    return report


def _bert_encoder(device):
    from transformers import BertConfig, BertModel

    from dpr_hpc.modeling.encoder import DprEncoder

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
    return DprEncoder(BertModel(config, add_pooling_layer=False), 384).to(device)


def nq_like_texts(rng: np.random.Generator, n: int, mean: float, sd: float, low: int, high: int):
    """Random token ids with NQ-like lengths ([CLS] ... [SEP]); token types 0 (question or title) then 1."""
    from dpr_hpc.modeling.batching import TokenizedTexts

    lengths = np.clip(rng.normal(mean, sd, n).round().astype(np.int64), low, high)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(1000, 30000, int(offsets[-1]), dtype=np.int32)
    ids[offsets[:-1]] = 101
    ids[offsets[1:] - 1] = 102
    types = np.zeros(int(offsets[-1]), dtype=np.int8)
    for start, length in zip(offsets[:-1], lengths):
        types[start + min(8, length // 4) : start + length] = 1  # a short title, then the text
    return TokenizedTexts(ids, types, offsets)


def _matmul_peak(precision: str, device) -> float:
    """Best GFLOP/s of square matrix multiplies (the kernels a transformer layer spends its time in)."""
    import torch

    from dpr_hpc.modeling.precision import _DTYPES

    dtype = _DTYPES.get(precision, torch.float32)
    best = 0.0
    for n in ((1024, 2048, 4096) if device.type == "cuda" else (512, 1024, 2048)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        (a @ b).sum().item()
        seconds = _median_time(lambda: a @ b, device, repeats=5)
        best = max(best, 2 * n**3 / seconds / 1e9)
        if device.type == "cpu" and seconds > 2:  # emulated formats are slow: one size is enough
            break
    return best


def _median_time(fn: Callable[[], Any], device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_flops(batch_shapes: list[tuple[int, int]], hidden: int = 384, layers: int = 6, ffn: int = 1536) -> float:
    """Multiply-add FLOPs of a BERT encoder over batches of (rows, padded length): the four
    attention projections, the feed-forward pair, and the two attention products."""
    total = 0.0
    for rows, length in batch_shapes:
        tokens = rows * length
        total += layers * (2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * rows * length * length * hidden)
    return total


def _bench_encoding(encoder, passages, device, precision, repeats, peaks, echo) -> dict[str, Any]:
    from dpr_hpc.modeling.batching import padded_width
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE, encode

    n = len(passages)
    ours = lambda: encode(encoder, passages, 0, OUR_ENCODE_BATCH, device, precision)  # noqa: E731
    paper = lambda: encode(encoder, passages, 0, PAPER_ENCODE_BATCH, device, "fp32", sort=False, pad_to=PAPER_PAD)  # noqa: E731
    ours_s, paper_s = [], []
    for _ in range(repeats):  # interleaved, so drifts in clock speed hit both alike
        ours_s.append(ours().encode_s)
        paper_s.append(paper().encode_s)
    lengths = np.sort(passages.lengths)[::-1]
    our_shapes = [(len(chunk), padded_width(int(chunk.max()), PAD_MULTIPLE)) for chunk in np.array_split(lengths, range(OUR_ENCODE_BATCH, n, OUR_ENCODE_BATCH))]
    computed = encoder_flops(our_shapes)
    useful = encoder_flops([(1, int(length)) for length in passages.lengths])
    paper_computed = encoder_flops([(n, PAPER_PAD)])
    t_ours, t_paper = statistics.median(ours_s), statistics.median(paper_s)
    result = {
        "passages": n, "mean_tokens": float(passages.lengths.mean()),
        "ours_per_s": n / t_ours, "paper_per_s": n / t_paper, "speedup": t_paper / t_ours,
        "flop_ratio": paper_computed / computed,
        "ours_gflops": computed / t_ours / 1e9, "useful_gflops": useful / t_ours / 1e9,
        "fraction_of_peak": computed / t_ours / 1e9 / peaks[precision], "peak_used": precision,
        "ours_s": ours_s, "paper_s": paper_s,
    }
    echo(f"encoding {n} passages (mean {result['mean_tokens']:.0f} tokens): ours {result['ours_per_s']:.1f}/s, "
         f"paper's way {result['paper_per_s']:.1f}/s -> {result['speedup']:.2f}x; "
         f"{result['ours_gflops']:.0f} GFLOP/s = {result['fraction_of_peak']:.0%} of the {precision} matmul peak; "
         f"the paper's way computes {result['flop_ratio']:.2f}x our FLOPs")
    return result


def _bench_training(device, precision, size: BenchSize, rng, echo) -> dict[str, Any]:
    import torch

    from dpr_hpc.grid.config import TrainConfig
    from dpr_hpc.modeling.batching import pad_batch, padded_width, rows_of, to_device
    from dpr_hpc.modeling.compute import adamw
    from dpr_hpc.modeling.encoding import PAD_MULTIPLE
    from dpr_hpc.modeling.precision import grad_scaler
    from dpr_hpc.modeling.train_step import backward_batch, clip_and_step

    steps = size.train_steps
    questions = nq_like_texts(rng, TRAIN_BATCH * (steps + 1), mean=12, sd=4, low=6, high=34)
    passages = nq_like_texts(rng, 2 * TRAIN_BATCH * (steps + 1), mean=140, sd=45, low=24, high=256)
    padding = {"ours": {"multiple": PAD_MULTIPLE}, "paper": {"pad_to": PAPER_PAD}}  # pad_batch's arguments

    def step_rows(step: int) -> tuple[list[int], list[int]]:
        """The questions of a step, and their positives and hard negatives."""
        return list(range(step * TRAIN_BATCH, (step + 1) * TRAIN_BATCH)), list(range(step * 2 * TRAIN_BATCH, (step + 1) * 2 * TRAIN_BATCH))

    def run(way: str, chunk: int = 0) -> tuple[float, float | None]:
        """Triples per second, and the peak GPU memory in GiB (None on CPU)."""
        torch.manual_seed(0)
        q_tower, p_tower = _bert_encoder(device).train(), _bert_encoder(device).train()
        params = list(q_tower.parameters()) + list(p_tower.parameters())
        # The train stage's AdamW (fused where PyTorch has it); the paper's way, torch's default.
        optimizer = adamw(params, 1e-5, TrainConfig.weight_decay, device)[0] if way == "ours" else torch.optim.AdamW(params, lr=1e-5)
        fmt = precision if way == "ours" else "fp32"
        scaler = grad_scaler(fmt, device)
        pad = padding[way]

        def batches(texts, rows: list[int]) -> list:
            size = chunk or len(rows)
            return [to_device(pad_batch(rows_of(texts, rows[i : i + size]), 0, **pad), device) for i in range(0, len(rows), size)]

        elapsed = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(steps + 1):  # step 0 warms up, untimed
            q_rows, p_rows = step_rows(step)
            q_batches, p_batches = batches(questions, q_rows), batches(passages, p_rows)
            _sync(device)
            start = time.perf_counter()
            backward_batch(q_tower, p_tower, q_batches, p_batches, bool(chunk), fmt, device, scaler)
            clip_and_step(params, optimizer, scaler, TrainConfig.max_grad_norm)
            _sync(device)
            if step:
                elapsed += time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return steps * TRAIN_BATCH / elapsed, peak

    def step_flops(step: int, pad: dict[str, int]) -> float:
        """A step's forward FLOPs with its batches padded the way `pad` (pad_batch's) says."""
        rows_per_tower = zip((questions, passages), step_rows(step))
        return encoder_flops([(len(rows), padded_width(int(texts.lengths[rows].max()), **pad)) for texts, rows in rows_per_tower])

    timed = range(1, steps + 1)
    flop_ratio = sum(step_flops(s, padding["paper"]) for s in timed) / sum(step_flops(s, padding["ours"]) for s in timed)
    chunk = TRAIN_BATCH // 4
    runs: dict[str, list[tuple[float, float | None]]] = {"ours": [], "paper": [], "grad_cache": []}
    for repeat in range(size.repeats):  # interleaved, so drifts in clock speed hit all three alike
        echo(f"  training run {repeat + 1}/{size.repeats}: ours, the paper's way, the gradient cache ({steps} timed steps each)")
        runs["ours"].append(run("ours"))
        runs["paper"].append(run("paper"))
        runs["grad_cache"].append(run("ours", chunk=chunk))
    ours, paper, cached = (statistics.median(rate for rate, _ in runs[way]) for way in ("ours", "paper", "grad_cache"))
    ours_peak, cached_peak = (max((peak for _, peak in runs[way] if peak is not None), default=None) for way in ("ours", "grad_cache"))
    result = {"ours_triples_per_s": ours, "paper_triples_per_s": paper, "speedup": ours / paper, "flop_ratio": flop_ratio, "steps": steps, "batch": TRAIN_BATCH,
              "repeats": size.repeats, "runs_triples_per_s": {way: [rate for rate, _ in got] for way, got in runs.items()},
              "grad_cache_triples_per_s": cached, "grad_cache_chunk": chunk, "grad_cache_time_cost": ours / cached - 1,
              "peak_gpu_gb": ours_peak, "grad_cache_peak_gpu_gb": cached_peak}
    echo(f"training (batch {TRAIN_BATCH}, two towers, AdamW): ours {ours:.2f} triples/s, paper's way {paper:.2f} -> {ours / paper:.2f}x; "
         f"the paper's way computes {flop_ratio:.2f}x our FLOPs")
    echo(f"gradient cache (the same batch in chunks of {chunk}): {cached:.2f} triples/s, {ours / cached - 1:+.0%} time per step")
    return result


def _bench_search(size: BenchSize, rng, echo) -> dict[str, Any]:
    import faiss

    from dpr_hpc.grid.config import IndexConfig
    from dpr_hpc.modeling.searcher import build_index, search_one_at_a_time

    vectors = rng.standard_normal((size.index_vectors, 384)).astype(np.float32)
    queries = rng.standard_normal((size.queries, 384)).astype(np.float32)
    index = build_index(IndexConfig(type="hnsw_flat", hnsw_m=64, ef_construction=100, ef_search=128), vectors)

    def bare() -> float:
        start = time.perf_counter()
        for row in range(len(queries)):
            index.search(queries[row : row + 1], 100)
        return time.perf_counter() - start

    def ours() -> float:
        start = time.perf_counter()
        search_one_at_a_time(index, queries, 100)
        return time.perf_counter() - start

    bare(), ours()  # warm caches
    ours_s, bare_s = [], []
    for _ in range(max(3, size.repeats)):
        ours_s.append(ours())
        bare_s.append(bare())
    overhead = statistics.median(ours_s) / statistics.median(bare_s) - 1
    result = {"ours_ms_per_query": statistics.median(ours_s) / len(queries) * 1e3, "bare_ms_per_query": statistics.median(bare_s) / len(queries) * 1e3,
              "overhead": overhead, "index": f"HNSW-Flat M=64 over {size.index_vectors} x 384", "faiss_threads": faiss.omp_get_max_threads()}
    echo(f"search, one query at a time ({result['index']}): ours {result['ours_ms_per_query']:.4f} ms, bare FAISS "
         f"{result['bare_ms_per_query']:.4f} ms -> overhead {overhead:+.1%}")
    return result


def _bench_token_cache(rng, echo) -> dict[str, Any]:
    from dpr_hpc.inputs.data import Passage
    from dpr_hpc.demo.generate import build_tokenizer
    from dpr_hpc.modeling.batching import tokenize_passages
    from dpr_hpc.inputs.content import sha256_bytes
    from dpr_hpc.modeling.token_cache import TokenCache

    words = [f"w{i}" for i in range(5000)]
    passages = [Passage(str(i), " ".join(rng.choice(words, 3)), " ".join(rng.choice(words, 100))) for i in range(20000)]
    tokenizer = build_tokenizer(sorted(set(words)))
    with tempfile.TemporaryDirectory() as folder:
        data_sha256 = sha256_bytes(json.dumps([{"passage_id": p.passage_id} for p in passages[:10]]).encode())
        cache = TokenCache(Path(folder) / "cache")
        seconds = []
        for _cell in ("first cell", "second cell"):
            start = time.perf_counter()
            cache.get("dev-passages", data_sha256, tokenizer, {"max_length": 256}, lambda: tokenize_passages(tokenizer, passages, 256, True))
            seconds.append(time.perf_counter() - start)
    result = {"passages": len(passages), "first_cell_s": seconds[0], "second_cell_s": seconds[1]}
    echo(f"tokenizing {len(passages)} passages: first cell {seconds[0]:.2f}s, second cell with the same tokenizer {seconds[1]:.3f}s (cache)")
    return result


def goals(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Each goal of issue 5 with whether this run met it."""
    enc, train, search = report["encode"], report["train"], report["search"]
    return [
        ("encoding >= 3x the paper's way", enc["speedup"] >= 3, f"{enc['speedup']:.2f}x (padding alone: {enc['flop_ratio']:.2f}x the FLOPs)"),
        ("encoding >= 55% of matmul peak", enc["fraction_of_peak"] >= 0.55, f"{enc['fraction_of_peak']:.0%} of {enc['peak_used']}"),
        ("training >= 3x the paper's way", train["speedup"] >= 3, f"{train['speedup']:.2f}x (padding alone: {train['flop_ratio']:.2f}x the FLOPs)"),
        ("search overhead <= 10%", search["overhead"] <= 0.10, f"{search['overhead']:+.1%}"),
        ("second cell tokenizes in ~0 s", report["token_cache"]["second_cell_s"] < 0.05 * report["token_cache"]["first_cell_s"],
         f"{report['token_cache']['second_cell_s']:.3f}s vs {report['token_cache']['first_cell_s']:.2f}s"),
    ]
