"""`dpr-hpc bench --scale`: what every stage phase costs at Natural Questions' size, on this node.

NQ-shaped data (dpr_hpc.demo.nq_shape; by default the full train file and the full dev pool,
each at a smaller fraction on request) goes
through the stages' own code phase by phase: parse and prepare (first load), map (second load,
as a later job or a requeue does), tokenise, encode with a tiny encoder, build an HNSW index
(M=512, efConstruction=200, d=768, the paper's) on random unit vectors, and search one query at
a time. Each phase runs in its own child process, so its peak RSS (the child's VmHWM) is its
own and not the high-water mark of an earlier phase. Disk is the size of what the phase wrote.

Where a phase ran on a fraction of full NQ (58,880 train questions, 935,159 pool passages) its
figures are extrapolated linearly to full NQ and flagged `extrapolated`; the peak RSS
extrapolates only the growth above what the child held before its work began (interpreter and
libraries), or for encoding only its output array, the one thing there that grows with the
pool (activations are per batch). HNSW builds are superlinear in the number of vectors, so
their linear extrapolation is a lower bound; the exponent fitted over the sizes built is
reported beside it. The pool is the paper's, duplicates counted (935,159); the stages index
each passage once, fewer (814,439 in the NQ-shaped file), so the pool's figures are high by that much.
Search time per query grows with log n, so it is reported as measured, never scaled.

The corpus phase (issue 24), pricing DPR's Wikipedia from one synthetic shard, is
dpr_hpc.bench.scale_corpus's; its tasks run as phases here, each in its own child too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

NQ_TRAIN_QUESTIONS = 58_880
NQ_POOL = 935_159
NQ_TEST_QUESTIONS = 3_610  # the corpus phase's questions (dpr_hpc.bench.scale_corpus)
INDEX_DIM = 768
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, TOP_K = 512, 200, 128, 100
MAX_LENGTH = 256
ENCODE_BATCH = 64
TOKENIZER_SAMPLE = 2000  # pool passages whose words make the benchmark's tokenizer's vocabulary

GOAL_TRAIN_RSS_BYTES = 4 * 2**30
GOAL_SECOND_LOAD_S = 5.0
GOAL_INDEX_RSS_RATIO = 1.5

@dataclass(frozen=True)
class ScaleSize:
    """How much of NQ each phase runs on: fractions of the train file and of the dev pool, the
    pool passages encoded, the HNSW sizes as fractions of the pool, and the queries searched."""

    train_fraction: float
    dev_fraction: float
    encode_sample: int
    hnsw_fractions: tuple[float, ...]
    search_queries: int
    corpus_passages: int = 1_000_000  # the synthetic Wikipedia shard (0: no corpus phase)
    corpus_questions: int = NQ_TEST_QUESTIONS  # searched against it, and merged over 50 shards


QUICK = ScaleSize(train_fraction=0.002, dev_fraction=0.002, encode_sample=128, hnsw_fractions=(0.0005, 0.001), search_queries=20,
                  corpus_passages=2000, corpus_questions=200)
FULL_CPU = ScaleSize(train_fraction=1.0, dev_fraction=1.0, encode_sample=10_000, hnsw_fractions=(0.01, 0.02, 0.05), search_queries=1000)


@dataclass(frozen=True)
class PhaseRun:
    """One phase as its child process measured it, and what it comes to at full NQ."""

    phase: str
    wall_s: float  # the phase's work, imports and interpreter start excluded
    peak_rss_bytes: int  # the child's VmHWM
    rss_before_bytes: int  # what the child held when its work began
    disk_bytes: int
    scale: float | None  # the share of full NQ it ran on (1.0: full size; None: a figure that is not scaled)
    details: dict[str, Any]

    def full_nq(self) -> dict[str, Any] | None:
        """Linear extrapolation to full NQ, flagged; the measured figures where it ran at full size."""
        if self.scale is None:
            return None
        factor = 1.0 / self.scale
        grown = self.rss_before_bytes + (self.peak_rss_bytes - self.rss_before_bytes) * factor
        if "rss_per_unit_bytes" in self.details:  # the phase knows what of its memory grows with size
            grown = self.peak_rss_bytes + self.details["rss_per_unit_bytes"] * self.details["units"] * (factor - 1)
        return {"wall_s": self.wall_s * factor, "peak_rss_bytes": int(grown), "disk_bytes": int(self.disk_bytes * factor),
                "extrapolated": self.scale < 1.0, "factor": factor}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "full_nq": self.full_nq()}


# ---------------------------------------------------------------------------------------------
# The parent: runs each phase in a child and puts the report together.

def run_scale_benchmark(size: ScaleSize, work: Path | None = None, echo: Callable[[str], None] = print,
                        gpu_check_report: Path | None = None, nq: bool = True) -> dict[str, Any]:
    """Every phase (`nq` False: the corpus phase alone). `gpu_check_report`: a `dpr-hpc
    gpu-check` report whose encode rate prices the corpus's encoding in GPU-hours."""
    from dpr_hpc.bench.scale_corpus import _corpus_plan, gpu_encode_rate
    from dpr_hpc.provenance import node_tags, now_iso

    gpu_rate = gpu_encode_rate(gpu_check_report) if gpu_check_report is not None else None
    report: dict[str, Any] = {"started_at": now_iso(), "node": node_tags(), "size": asdict(size),
                              "full_nq": {"train_questions": NQ_TRAIN_QUESTIONS, "pool_passages": NQ_POOL},
                              "hnsw": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH, "dim": INDEX_DIM, "k": TOP_K}}
    plan = (_phase_plan(size) if nq else []) + _corpus_plan(size)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        folder = Path(work) if work is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        runs = [_run_phase(name, params, folder, echo) for name, params in plan]
    report["phases"] = [run.to_json() for run in runs]
    report.update(summarise(runs, gpu_rate))
    report["finished_at"] = now_iso()
    return report


def summarise(runs: list[PhaseRun], gpu_rate: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the phases come to: the HNSW build at full size, the index stage's memory, the
    corpus at Wikipedia's size, and the goals of whichever parts ran."""
    from dpr_hpc.bench.scale_corpus import corpus_estimate, corpus_goals

    summary: dict[str, Any] = {"goals": []}
    if any(r.phase == "hnsw-build" for r in runs):
        scaling = hnsw_scaling([r for r in runs if r.phase == "hnsw-build"])
        index_stage = index_stage_estimate(runs, scaling)
        summary.update({"hnsw_scaling": scaling, "index_stage": index_stage})
        summary["goals"] += goals(runs, index_stage)
    if any(r.phase.startswith("corpus-") for r in runs):
        summary["corpus"] = corpus_estimate(runs, gpu_rate)
        summary["goals"] += corpus_goals(runs, summary["corpus"])
    return summary


def phase_runs(report: dict[str, Any]) -> list[PhaseRun]:
    """The phases of a written report, as measured (its `full_nq` figures are derived, not read)."""
    fields = {f for f in PhaseRun.__dataclass_fields__}
    return [PhaseRun(**{k: v for k, v in row.items() if k in fields}) for row in report["phases"]]


def _phase_plan(size: ScaleSize) -> list[tuple[str, dict[str, Any]]]:
    train, dev = size.train_fraction, size.dev_fraction
    pool_sizes = [max(2, round(f * NQ_POOL)) for f in size.hnsw_fractions]
    return [
        *[("generate", {"fraction": f}) for f in sorted({train, dev})],
        ("prepare-train", {"split": "train", "fraction": train, "expect_hit": False}),
        ("prepare-dev", {"split": "dev", "fraction": dev, "expect_hit": False}),
        ("load-train", {"split": "train", "fraction": train, "expect_hit": True}),
        ("load-dev", {"split": "dev", "fraction": dev, "expect_hit": True}),
        ("tokenise-train", {"fraction": train, "dev_fraction": dev}),
        ("tokenise-pool", {"fraction": dev}),
        ("encode", {"sample": size.encode_sample, "dev_fraction": dev}),
        *[("hnsw-build", {"vectors": n}) for n in pool_sizes],
        ("search", {"vectors": pool_sizes[-1], "queries": size.search_queries}),
    ]


def _run_phase(name: str, params: dict[str, Any], work: Path, echo: Callable[[str], None]) -> PhaseRun:
    """The phase in a fresh interpreter, whose peak RSS is its own: the child's VmHWM, which
    starts afresh at exec. (Not its ru_maxrss: Linux carries that over from the forking parent,
    so every child would report at least the parent's RSS at the fork.)"""
    result_file = work / f".phase-{name}-{os.getpid()}.json"
    command = [sys.executable, "-m", "dpr_hpc.bench.scale", name, json.dumps(params), str(work), str(result_file)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench --scale: phase {name} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    measured = json.loads(result_file.read_text())
    result_file.unlink()
    # Other work on the node slows a phase down: the 1-minute load average before and after it says how much there was.
    measured["details"]["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    run = PhaseRun(phase=name, **measured)
    echo(f"{_label(run):<28} {run.wall_s:9.2f} s  peak RSS {_gib(run.peak_rss_bytes):6.2f} GiB  disk {_gib(run.disk_bytes):6.2f} GiB   "
         + _full_nq_words(run))
    return run


def _full_nq_words(run: PhaseRun) -> str:
    if run.phase.startswith("corpus-"):
        from dpr_hpc.bench.scale_corpus import _corpus_words

        return _corpus_words(run)
    full = run.full_nq()
    if full is None:
        return f"full NQ: not scaled ({run.details['note']})"
    how = f"extrapolated x{full['factor']:.3g}" if full["extrapolated"] else "measured"
    return f"full NQ ({how}): {full['wall_s']:.1f} s, {_gib(full['peak_rss_bytes']):.2f} GiB, disk {_gib(full['disk_bytes']):.2f} GiB"


def _label(run: PhaseRun) -> str:
    if run.phase == "hnsw-build":
        return f"{run.phase} ({run.details['vectors']:,})"
    if run.phase in ("corpus-encode-shard", "corpus-search-shard"):
        return f"{run.phase} ({run.details['passages']:,})"
    return f"{run.phase} ({run.scale:g})" if run.phase == "generate" else run.phase


def _gib(n: float) -> float:
    return n / 2**30


def hnsw_scaling(builds: list[PhaseRun]) -> dict[str, Any]:
    """Build time and index size at full pool size. The time is extrapolated linearly from the
    largest build, a lower bound: inserts get dearer as the graph grows. The exponent of a
    log-log fit over the builds says how much dearer, over the sizes measured; extrapolating
    with it is not done, because at M=512 the small sizes are still filling each node's 1,024
    level-0 neighbour slots, and a shared node's load drifts between builds."""
    largest = max(builds, key=lambda r: r.details["vectors"])
    exponent = None
    if len(builds) >= 2:
        xs = [math.log(r.details["vectors"]) for r in builds]
        ys = [math.log(max(r.wall_s, 1e-9)) for r in builds]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        exponent = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return {"largest_vectors": largest.details["vectors"], "build_s_linear": largest.wall_s / largest.scale,
            "linear_is_lower_bound": exponent is not None and exponent > 1, "fitted_exponent": exponent,
            "index_bytes": int(largest.details["index_bytes"] / largest.scale), "extrapolated": largest.scale < 1.0}


def index_stage_estimate(runs: list[PhaseRun], scaling: dict[str, Any]) -> dict[str, Any]:
    """The index stage's peak RSS at full NQ. The stage has two peaks, one after the other: while
    it encodes it holds the tokenised pool, the encoder and the embeddings (the encode phase,
    extrapolated, with bert-base's 110 M fp32 weights in place of the tiny encoder's); then it
    writes the embeddings to disk, drops all three and builds the index from the file (the HNSW
    phase, extrapolated, on the encode phase's baseline of imported libraries)."""
    build = max((r for r in runs if r.phase == "hnsw-build"), key=lambda r: r.details["vectors"])
    encode = next(r for r in runs if r.phase == "encode")
    encoder_bytes = 110_000_000 * 4
    encoding_peak = encode.full_nq()["peak_rss_bytes"] + encoder_bytes
    building_peak = build.full_nq()["peak_rss_bytes"] - build.rss_before_bytes + encode.rss_before_bytes
    peak = max(encoding_peak, building_peak)
    return {"peak_rss_bytes": peak, "encoding_peak_rss_bytes": encoding_peak, "building_peak_rss_bytes": building_peak,
            "encoder_bytes": encoder_bytes, "index_bytes": scaling["index_bytes"], "ratio": peak / scaling["index_bytes"],
            "extrapolated": True}


def goals(runs: list[PhaseRun], index_stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's three goals, each with whether this run met it and the figure it was judged on."""
    by_phase = {r.phase: r for r in runs}
    train_path = [by_phase[p] for p in ("prepare-train", "load-train", "tokenise-train")]
    train_peak = max(r.full_nq()["peak_rss_bytes"] for r in train_path)
    second = [by_phase[p] for p in ("load-train", "load-dev")]
    second_s = max(r.full_nq()["wall_s"] for r in second)
    return [
        {"goal": "train data path <= 4 GiB peak RSS at full NQ", "met": train_peak <= GOAL_TRAIN_RSS_BYTES,
         "measured": f"{_gib(train_peak):.2f} GiB", "extrapolated": any(r.scale < 1 for r in train_path)},
        {"goal": "second job's data load <= 5 s", "met": second_s <= GOAL_SECOND_LOAD_S,
         "measured": f"{second_s:.2f} s", "extrapolated": any(r.scale < 1 for r in second)},
        {"goal": "index stage peak RSS <= 1.5x the FAISS index", "met": index_stage["ratio"] <= GOAL_INDEX_RSS_RATIO,
         "measured": f"{index_stage['ratio']:.2f}x ({_gib(index_stage['peak_rss_bytes']):.2f} GiB / {_gib(index_stage['index_bytes']):.2f} GiB)",
         "extrapolated": True},
    ]


def hnsw_summary(report: dict[str, Any]) -> str:
    scaling = report["hnsw_scaling"]
    growth = f"; the builds grew as n^{scaling['fitted_exponent']:.2f} over the sizes built" if scaling["fitted_exponent"] is not None else ""
    bound = "at least " if scaling["linear_is_lower_bound"] else ""
    return (f"HNSW build at {NQ_POOL:,} vectors (extrapolated): {bound}{scaling['build_s_linear'] / 3600:.1f} h, linear from "
            f"{scaling['largest_vectors']:,}{growth}; index {_gib(scaling['index_bytes']):.2f} GiB; the index stage's peak RSS "
            f"{_gib(report['index_stage']['peak_rss_bytes']):.2f} GiB")


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: measured figures, then full NQ, each flagged."""
    lines = ["| phase | ran on | wall | peak RSS | disk | full NQ: wall | full NQ: peak RSS | full NQ: disk |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["phases"]:
        if row["phase"].startswith("corpus-"):
            continue  # corpus_table's
        full, details = row["full_nq"], row["details"]
        ran_on = details.get("ran_on", "")
        mark = " (extrapolated)" if full and full["extrapolated"] else ""
        measured = f"| {row['phase']} | {ran_on} | {row['wall_s']:.2f} s | {_gib(row['peak_rss_bytes']):.2f} GiB | {_gib(row['disk_bytes']):.2f} GiB "
        if full is None:
            lines.append(measured + f"| {details['ms_per_query']:.2f} ms/query, as measured (not scaled) | | |")
        else:
            lines.append(measured + f"| {full['wall_s']:.1f} s{mark} | {_gib(full['peak_rss_bytes']):.2f} GiB{mark} | {_gib(full['disk_bytes']):.2f} GiB{mark} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The children: one phase each, run as `python -m dpr_hpc.bench.scale PHASE PARAMS WORK RESULT`.

class PhaseTimer:
    """Times a phase's work and notes the RSS when it begins (after imports and setup)."""

    def __init__(self) -> None:
        self.began = 0.0
        self.rss_before = 0

    def start(self) -> None:
        self.rss_before = _memory_status("VmRSS")
        self.began = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def _memory_status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since exec) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: bench --scale measures memory on Linux only")


def disk_usage(*paths: Path) -> int:
    """Bytes of the files under `paths` (files or folders)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def _data(work: Path) -> Path:
    return work / "data"


def _runs_root(work: Path) -> Path:
    return work / "runs"


def _tokens(work: Path) -> Path:
    return work / "tokens"


def _indexes(work: Path) -> Path:
    return work / "indexes"


def _data_file(work: Path, split: str, fraction: float) -> Path:
    """Each fraction's files in their own folder: the generator writes both splits at once."""
    return _data(work) / f"fraction-{fraction:g}" / f"{split}.json"


def _prepared_cache(work: Path) -> Path:
    from dpr_hpc.store.paths import StageStore

    return StageStore(_runs_root(work)).prepared_cache


def _phase_generate(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    from dpr_hpc.demo.nq_shape import write_nq_shaped

    fraction = float(params["fraction"])
    folder = _data_file(work, "train", fraction).parent
    meter.start()
    summary = write_nq_shaped(folder, fraction)
    wall = meter.elapsed()
    return {"wall_s": wall, "disk_bytes": disk_usage(folder), "scale": fraction,
            "details": {"ran_on": f"fraction {fraction:g}: {summary['train']['records']:,} train questions, "
                                  f"pool of {summary['dev']['pool_with_duplicates']:,}", "summary": summary}}


def _phase_prepare(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The first job's load (parse the JSON, write the columns), or with `expect_hit` a later
    job's (map them): the stages' own load_train / load_dev."""
    from dpr_hpc.inputs import prepared

    split, fraction, expect_hit = params["split"], float(params["fraction"]), bool(params["expect_hit"])
    load = {"train": prepared.load_train, "dev": prepared.load_dev}[split]
    cache = _prepared_cache(work)
    before = disk_usage(cache)
    meter.start()
    data = load(_data_file(work, split, fraction), cache)
    size = len(data.pool) if split == "dev" else len(data)
    wall = meter.elapsed()
    if data.hit != expect_hit:
        raise RuntimeError(f"{split} data was {'mapped' if data.hit else 'prepared'}, expected it {'mapped' if expect_hit else 'prepared'}")
    counted = f"{size:,} pool passages" if split == "dev" else f"{size:,} train examples"
    return {"wall_s": wall, "disk_bytes": disk_usage(cache) - before, "scale": fraction,
            "details": {"ran_on": counted, "hit": data.hit, "load_s": data.load_s, "entry": data.folder.name,
                        "entry_bytes": disk_usage(data.folder)}}


def _phase_tokenise_train(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The train stage's tokenising (hard_negative: first): every question, its first positive
    and its first hard negative, read from the mapped columns."""
    from dpr_hpc.modeling.batching import tokenize_passages, tokenize_questions
    from dpr_hpc.inputs.prepared import load_train

    fraction = float(params["fraction"])
    tokenizer = _tokenizer(work, float(params["dev_fraction"]))
    meter.start()
    examples = load_train(_data_file(work, "train", fraction), _prepared_cache(work))
    counts = examples.negative_counts
    first_negatives = examples.negatives.take(examples.negative_offsets[:-1][counts > 0])
    parts = {"questions": tokenize_questions(tokenizer, examples.questions, MAX_LENGTH),
             "positives": tokenize_passages(tokenizer, examples.positives, MAX_LENGTH, True),
             "negatives": tokenize_passages(tokenizer, first_negatives, MAX_LENGTH, True)}
    wall = meter.elapsed()
    written = [_save_tokens(work, f"train-{name}", texts) for name, texts in parts.items()]
    return {"wall_s": wall, "disk_bytes": disk_usage(*written), "scale": fraction,
            "details": {"ran_on": f"{len(examples):,} examples (question, positive, first hard negative)",
                        "token_bytes": sum(_token_bytes(t) for t in parts.values()),
                        "mean_passage_tokens": float(parts["positives"].lengths.mean())}}


def _phase_tokenise_pool(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The index stage's tokenising: the whole evaluation pool, read from the mapped columns."""
    from dpr_hpc.modeling.batching import tokenize_passages
    from dpr_hpc.inputs.prepared import load_dev

    fraction = float(params["fraction"])
    tokenizer = _tokenizer(work, fraction)
    meter.start()
    pool = load_dev(_data_file(work, "dev", fraction), _prepared_cache(work)).pool
    texts = tokenize_passages(tokenizer, pool, MAX_LENGTH, True)
    wall = meter.elapsed()
    written = _save_tokens(work, "pool", texts)
    return {"wall_s": wall, "disk_bytes": disk_usage(written), "scale": fraction,
            "details": {"ran_on": f"{len(pool):,} pool passages", "token_bytes": _token_bytes(texts),
                        "mean_passage_tokens": float(texts.lengths.mean())}}


def _phase_encode(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The index stage's encoding (length-sorted, per-batch padding, precision auto, the grid's
    default batch 512) of the pool's first `sample` passages with a tiny 2-layer BERT projected
    to 768, so the embeddings have the paper's size."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from dpr_hpc.demo.generate import MODEL_CONFIGS
    from dpr_hpc.modeling.batching import TokenizedTexts
    from dpr_hpc.modeling.encoder import DprEncoder
    from dpr_hpc.modeling.encoding import encode
    from dpr_hpc.modeling.precision import resolve_precision
    from dpr_hpc.modeling.device import pick_device

    tokenizer = _tokenizer(work, float(params["dev_fraction"]))
    pool = TokenizedTexts.load(_tokens(work) / "pool.npz")
    sample = first_rows(pool, min(int(params["sample"]), len(pool)))
    fields = {k: v for k, v in MODEL_CONFIGS["tiny-bert"].items() if k != "family"}
    torch.manual_seed(0)
    encoder = DprEncoder(BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **fields), add_pooling_layer=False), INDEX_DIM)
    device = pick_device()
    precision = resolve_precision("auto", device)
    meter.start()
    encoded = encode(encoder, sample, tokenizer.pad_token_id, 512, device, precision)
    wall = meter.elapsed()
    out = work / "embeddings-sample.npy"
    np.save(out, encoded.embeddings)
    return {"wall_s": wall, "disk_bytes": disk_usage(out), "scale": len(sample) / NQ_POOL,
            "details": {"ran_on": f"{len(sample):,} pool passages, tiny BERT (2 x 64) -> 768", "encode_s": encoded.encode_s,
                        "precision": precision, "passages_per_s": len(sample) / encoded.encode_s,
                        # What grows with the pool is encode's output array; activations are per batch.
                        "units": len(sample), "rss_per_unit_bytes": INDEX_DIM * 4}}


def first_rows(texts, n: int):
    """The first n sequences of tokenized texts, as tokenized texts (views, no copy)."""
    from dpr_hpc.modeling.batching import TokenizedTexts

    end = int(texts.offsets[n])
    return TokenizedTexts(texts.ids[:end], None if texts.types is None else texts.types[:end], texts.offsets[: n + 1])


def _tokenizer(work: Path, dev_fraction: float):
    """A BERT-style fast tokenizer whose vocabulary is the words of the pool's first passages
    (built offline as the demo builds its own), saved once and loaded by every later phase."""
    from transformers import PreTrainedTokenizerFast

    folder = work / "tokenizer"
    if not folder.is_dir():
        from dpr_hpc.demo.generate import build_tokenizer
        from dpr_hpc.inputs.prepared import load_dev

        pool = load_dev(_data_file(work, "dev", dev_fraction), _prepared_cache(work)).pool
        build_tokenizer([f"{p.title} {p.text}" for p in pool[:TOKENIZER_SAMPLE]]).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _save_tokens(work: Path, name: str, texts) -> Path:
    path = _tokens(work) / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    texts.save(path)
    return path


def _token_bytes(texts) -> int:
    return int(texts.ids.nbytes + texts.offsets.nbytes + (texts.types.nbytes if texts.types is not None else 0))


def _phase_hnsw_build(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The index stage's build: random unit vectors on disk, added a chunk at a time by the
    stage's own build_index_from_file, so the child holds the index and one chunk, as the stage does."""
    import numpy as np

    from dpr_hpc.grid.config import IndexConfig
    from dpr_hpc.modeling.searcher import build_index_from_file, save_index

    n = int(params["vectors"])
    config = _hnsw_config(IndexConfig)
    embeddings = work / f"hnsw-{n}-vectors.npy"
    write_random_unit_vectors(embeddings, np.random.default_rng(n), n)
    meter.start()
    built = build_index_from_file(config, embeddings)
    wall = meter.elapsed()
    digest = save_index(built.index, _index_file(work, n))
    embeddings.unlink()
    return {"wall_s": wall, "disk_bytes": digest.size, "scale": n / NQ_POOL,
            "details": {"vectors": n, "ran_on": f"{n:,} vectors", "index_bytes": digest.size, "vectors_bytes": n * INDEX_DIM * 4,
                        "add_s": built.add_s, "add_chunk_rows": config.add_batch_size,
                        # What grows with the pool is the index itself; the chunk read is fixed.
                        "units": n, "rss_per_unit_bytes": digest.size / n,
                        "note": "wall is the build from the vectors on disk (chunks read and added); disk is the serialised index"}}


def _phase_search(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    import numpy as np

    from dpr_hpc.grid.config import IndexConfig
    from dpr_hpc.modeling.searcher import load_index, search_one_at_a_time

    n, queries = int(params["vectors"]), int(params["queries"])
    meter.start()
    index = load_index(_index_file(work, n), _hnsw_config(IndexConfig))
    found = search_one_at_a_time(index, random_unit_vectors(np.random.default_rng(-1 % 2**32), queries), TOP_K)
    wall = meter.elapsed()
    return {"wall_s": wall, "disk_bytes": 0, "scale": None,
            "details": {"vectors": n, "queries": queries, "ran_on": f"{queries:,} queries, {n:,} vectors",
                        "ms_per_query": float(found.times_ms.mean()), "ms_sd": float(found.times_ms.std()),
                        "ms_median": float(np.median(found.times_ms)),
                        "note": "not extrapolated: per-query HNSW search time grows about with log n, not n"}}


def _hnsw_config(index_config_class):
    return index_config_class(type="hnsw_flat", hnsw_m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)


def _index_file(work: Path, vectors: int) -> Path:
    return _indexes(work) / f"hnsw-{vectors}.faiss"


def write_random_unit_vectors(path: Path, rng, n: int, dim: int = INDEX_DIM) -> None:
    """float32 rows of unit length as a .npy file, drawn and written in blocks so that no copy of
    the whole array is ever in memory."""
    import numpy as np

    with path.open("wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, 65536):
            block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
            (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32).tofile(handle)


def random_unit_vectors(rng, n: int, dim: int = INDEX_DIM):
    """float32 rows of unit length (the search phase's queries)."""
    import numpy as np

    block = rng.standard_normal((n, dim), dtype=np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


PHASES: dict[str, Callable[[dict[str, Any], Path, PhaseTimer], dict[str, Any]]] = {
    "generate": _phase_generate,
    "prepare-train": _phase_prepare,
    "prepare-dev": _phase_prepare,
    "load-train": _phase_prepare,
    "load-dev": _phase_prepare,
    "tokenise-train": _phase_tokenise_train,
    "tokenise-pool": _phase_tokenise_pool,
    "encode": _phase_encode,
    "hnsw-build": _phase_hnsw_build,
    "search": _phase_search,
}


def child_main(argv: list[str]) -> int:
    """One phase, NQ's or the corpus's (dpr_hpc.bench.scale_corpus, imported here: it imports this module)."""
    from dpr_hpc.bench.scale_corpus import CORPUS_PHASES

    name, params, work, result_file = argv
    timer = PhaseTimer()
    measured = {**PHASES, **CORPUS_PHASES}[name](json.loads(params), Path(work), timer)
    measured["rss_before_bytes"] = timer.rss_before
    measured["peak_rss_bytes"] = _memory_status("VmHWM")
    Path(result_file).write_text(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
