"""`dpr-hpc bench --scale`'s corpus phase: what evaluating a cell on DPR's Wikipedia costs, on this node.

The corpus phase (issue 24) prices evaluating a cell on DPR's Wikipedia, 21,015,324 passages of
100 words in 50 shards, from one synthetic shard of its own size (1 M passages by default):
- encode-shard: token ids of the lengths 100-word passages have, encoded by a tiny BERT
  projected to 768 (the stages' own encode), its vectors written as fp32 and as fp16;
- search-shard: NQ's 3,610 test questions' exact inner-product top 100 over that shard's vectors,
  streamed from disk a block at a time as the stage does (modeling.searcher.exact_search_streamed);
- merge: 3,610 questions x 50 shards x top-100 of generated scores merged by merge_top_k.
Each task's time, peak RSS and disk are measured, then extrapolated linearly to a shard of the
real corpus (420,307 passages) and to all 50, flagged as an extrapolation; encoding on a GPU is
priced at the bert-base encode rate a `dpr-hpc gpu-check` report measured, where one is given.

Its tasks run as phases of dpr_hpc.bench.scale (each in its own child, `python -m
dpr_hpc.bench.scale corpus-... PARAMS WORK RESULT`), which imports this module only where it
needs it, so that this module can use its machinery at module level without an import cycle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from dpr_hpc.bench.scale import (INDEX_DIM, MAX_LENGTH, NQ_TEST_QUESTIONS, TOP_K, PhaseRun, PhaseTimer, ScaleSize, _gib, _memory_status,
                                 disk_usage, random_unit_vectors)

# DPR's psgs_w100.tsv, in the 50 shards DPR's own generate_dense_embeddings.py cuts it into (NQ's test questions: scale.NQ_TEST_QUESTIONS).
WIKIPEDIA_PASSAGES, WIKIPEDIA_SHARDS = 21_015_324, 50
# Token lengths of a 100-word passage with its title: at least a token a word, [CLS] and two [SEP].
W100_LENGTHS = {"mean": 140, "sd": 20, "low": 104, "high": MAX_LENGTH}
BERT_BASE_BYTES = 110_000_000 * 4  # the passage tower a real cell encodes with, fp32
GOAL_SHARD_RSS_RATIO = 1.5
GOAL_MERGE_S = 60.0


def _corpus_plan(size: ScaleSize) -> list[tuple[str, dict[str, Any]]]:
    if not size.corpus_passages:
        return []
    n, questions = size.corpus_passages, size.corpus_questions
    return [("corpus-encode-shard", {"passages": n}), ("corpus-search-shard", {"passages": n, "questions": questions}),
            ("corpus-merge", {"questions": questions, "shards": WIKIPEDIA_SHARDS, "k": TOP_K})]


def shard_passages() -> int:
    """Passages in one of the real corpus's shards (the last is a few short)."""
    return -(-WIKIPEDIA_PASSAGES // WIKIPEDIA_SHARDS)


def gpu_encode_rate(path: Path) -> dict[str, Any]:
    """The bert-base encode rate (our way) a `dpr-hpc gpu-check` report measured, with its GPU;
    a clear error when the file is not such a report."""
    from dpr_hpc.errors import UsageError

    try:
        report = json.loads(Path(path).read_text())
        ours = report["pei"]["ours"]
        rate = ours.get("passages_per_s") or report["pei"]["sample"] / ours["sample_s"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as error:
        raise UsageError(f"--gpu-check {path}: expected a `dpr-hpc gpu-check` report with a measured pei.ours encode ({error})") from None
    if report.get("smoke"):
        raise UsageError(f"--gpu-check {path}: a --smoke report measures tiny shapes on the CPU, not a GPU's encode rate")
    return {"passages_per_s": float(rate), "gpu": report.get("node", {}).get("gpu_name"), "precision": ours.get("precision"),
            "report": str(path), "model": "bert-base-uncased"}


def corpus_estimate(runs: list[PhaseRun], gpu_rate: dict[str, Any] | None) -> dict[str, Any]:
    """Each shard task at the real shard's size (420,307 passages) and all 50 of them, scaled
    linearly from the synthetic shard (encoding and exact search are both linear in passages);
    flagged as an extrapolation. A task's peak RSS scales only what grows with its passages
    (`rss_per_passage_bytes`: the vectors, and for encoding the token ids), the rest (libraries,
    activations, a chunk) stays; the encode task's is given with bert-base's weights in place
    of the tiny encoder's. The merge ran at full size (3,610 x 50 x 100), reported as measured."""
    by_phase = {r.phase: r for r in runs}
    encode, search = by_phase["corpus-encode-shard"], by_phase["corpus-search-shard"]
    per_shard = shard_passages()
    factor = per_shard / encode.details["passages"]

    def at_shard(run: PhaseRun, model_bytes: int = 0) -> dict[str, Any]:
        grown = run.details["rss_per_passage_bytes"] * (per_shard - run.details["passages"])
        rss = run.peak_rss_bytes + grown - run.details.get("model_bytes", 0) + model_bytes
        vectors = per_shard * INDEX_DIM * 4
        return {"wall_s": run.wall_s * factor, "peak_rss_bytes": int(rss), "disk_bytes": int(run.disk_bytes * factor),
                "vectors_bytes": vectors, "model_bytes": model_bytes, "rss_ratio": rss / (vectors + model_bytes)}

    encode_task, search_task = at_shard(encode, BERT_BASE_BYTES), at_shard(search)
    vectors_fp32 = WIKIPEDIA_PASSAGES * INDEX_DIM * 4
    result: dict[str, Any] = {
        "extrapolated": True, "from_passages": encode.details["passages"], "factor": factor,
        "corpus": {"passages": WIKIPEDIA_PASSAGES, "shards": WIKIPEDIA_SHARDS, "shard_passages": per_shard, "questions": NQ_TEST_QUESTIONS},
        "encode_task": {**encode_task, "model": "bert-base (fp32 weights) in place of the tiny encoder",
                        "cpu_hours_tiny_encoder": encode.wall_s * factor * WIKIPEDIA_SHARDS / 3600},
        "search_task": search_task,
        "all_shards": {"encode_wall_s": encode_task["wall_s"] * WIKIPEDIA_SHARDS, "search_wall_s": search_task["wall_s"] * WIKIPEDIA_SHARDS,
                       "vectors_fp32_bytes": vectors_fp32, "vectors_fp16_bytes": vectors_fp32 // 2,
                       "disk_bytes": encode_task["disk_bytes"] * WIKIPEDIA_SHARDS + search_task["disk_bytes"] * WIKIPEDIA_SHARDS},
        "merge": {"wall_s": by_phase["corpus-merge"].wall_s, "questions": by_phase["corpus-merge"].details["questions"], "measured": True}
        if "corpus-merge" in by_phase else None,
    }
    if gpu_rate:
        hours = WIKIPEDIA_PASSAGES / gpu_rate["passages_per_s"] / 3600
        result["gpu_hours"] = {**gpu_rate, "hours": hours, "per_shard_hours": hours / WIKIPEDIA_SHARDS,
                               "note": "encoding only, at the gpu-check's measured rate, extrapolated to 21,015,324 passages"}
    else:
        result["gpu_hours"] = {"hours": None, "note": "none measured: no GPU encode rate given (`--gpu-check REPORT` from `dpr-hpc gpu-check` on a GPU)"}
    return result


def corpus_goals(runs: list[PhaseRun], estimate: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Issue 24's goals: a shard task's peak RSS against its shard's vectors plus the model, as
    measured on the synthetic shard (tiny encoder) and at a real shard with bert-base
    (extrapolated), and the merge's time at full size."""
    rows = []
    for task in ("encode", "search"):
        at_shard = (estimate or {}).get(f"{task}_task")
        if at_shard:
            rows.append({"goal": f"{task}-shard peak RSS <= 1.5x vectors + model, real shard", "met": at_shard["rss_ratio"] <= GOAL_SHARD_RSS_RATIO,
                         "measured": f"{at_shard['rss_ratio']:.2f}x ({_gib(at_shard['peak_rss_bytes']):.2f} GiB / "
                                     f"{_gib(at_shard['vectors_bytes'] + at_shard['model_bytes']):.2f} GiB, {shard_passages():,} passages)",
                         "extrapolated": True})
    for run in runs:
        if run.phase in ("corpus-encode-shard", "corpus-search-shard"):
            budget = run.details["vectors_bytes"] + run.details.get("model_bytes", 0)
            ratio = run.peak_rss_bytes / budget
            rows.append({"goal": f"{run.phase[7:]} peak RSS <= 1.5x vectors + model, as run", "met": ratio <= GOAL_SHARD_RSS_RATIO,
                         "measured": f"{ratio:.2f}x ({_gib(run.peak_rss_bytes):.2f} GiB / {_gib(budget):.2f} GiB, {run.details['passages']:,} passages)",
                         "extrapolated": False})
        if run.phase == "corpus-merge":
            full = (run.details["questions"], run.details["shards"], run.details["k"]) == (NQ_TEST_QUESTIONS, WIKIPEDIA_SHARDS, TOP_K)
            rows.append({"goal": "merge 3,610 x 50 shards x top-100 <= 60 s", "met": run.wall_s <= GOAL_MERGE_S,
                         "measured": f"{run.wall_s:.2f} s" + ("" if full else f" (on {run.details['questions']:,} questions only)"), "extrapolated": False})
    return rows


def _corpus_words(run: PhaseRun) -> str:
    if run.phase == "corpus-merge":
        return f"{run.details['questions']:,} questions x {run.details['shards']} shards x top-{run.details['k']}: as measured"
    factor = shard_passages() / run.details["passages"]
    return f"a real shard ({shard_passages():,}; extrapolated x{factor:.3g}): {run.wall_s * factor:.1f} s"


def corpus_summary(report: dict[str, Any]) -> str:
    """The corpus phase at Wikipedia's size, in a few lines, each figure flagged."""
    corpus = report.get("corpus")
    if not corpus:
        return ""
    enc, search, every = corpus["encode_task"], corpus["search_task"], corpus["all_shards"]
    gpu = corpus["gpu_hours"]
    gpu_words = (f"{gpu['hours']:.1f} GPU-hours to encode it with bert-base on {gpu['gpu']} ({gpu['passages_per_s']:.0f} passages/s, "
                 f"{gpu['precision']}; {gpu['per_shard_hours'] * 60:.1f} min a shard)" if gpu["hours"] is not None else f"GPU-hours: {gpu['note']}")
    lines = [
        f"Wikipedia ({WIKIPEDIA_PASSAGES:,} passages in {WIKIPEDIA_SHARDS} shards of {shard_passages():,}), EXTRAPOLATED x{corpus['factor']:.3g} "
        f"from a synthetic shard of {corpus['from_passages']:,}:",
        f"  encode-shard task: {enc['wall_s'] / 60:.1f} min with the tiny encoder on this node, peak RSS {_gib(enc['peak_rss_bytes']):.2f} GiB "
        f"(with bert-base's weights), disk {_gib(enc['disk_bytes']):.2f} GiB (fp32 + fp16 vectors)",
        f"  search-shard task (exact, streamed, {NQ_TEST_QUESTIONS:,} questions, top-{TOP_K}): {search['wall_s']:.1f} s, "
        f"peak RSS {_gib(search['peak_rss_bytes']):.2f} GiB",
        f"  all {WIKIPEDIA_SHARDS} shards: vectors {_gib(every['vectors_fp32_bytes']):.1f} GiB ({every['vectors_fp32_bytes'] / 1e9:.1f} GB) in fp32, {_gib(every['vectors_fp16_bytes']):.1f} GiB in fp16; "
        f"search {every['search_wall_s'] / 3600:.2f} h of tasks on this node",
        f"  {gpu_words}",
    ]
    if corpus["merge"]:
        lines.append(f"  merge of {corpus['merge']['questions']:,} questions x {WIKIPEDIA_SHARDS} shards x top-{TOP_K}: {corpus['merge']['wall_s']:.2f} s (measured)")
    return "\n".join(lines)


def _corpus_vectors(work: Path, dtype: str) -> Path:
    return work / "corpus" / f"shard-vectors-{dtype}.npy"


def _phase_corpus_encode_shard(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """An encode-shard task on a synthetic shard: token ids of 100-word passages' lengths (a real
    task reads its shard's tokenised passages), encoded by a tiny BERT projected to 768 with the
    stages' own encode (length-sorted, per-batch padding, precision auto, batch 512), then
    written as fp32 and as fp16 vectors, with the passage ids."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from dpr_hpc.bench.stages import nq_like_texts
    from dpr_hpc.demo.generate import MODEL_CONFIGS
    from dpr_hpc.modeling.encoder import DprEncoder
    from dpr_hpc.modeling.encoding import encode
    from dpr_hpc.modeling.precision import resolve_precision
    from dpr_hpc.modeling.device import pick_device

    n = int(params["passages"])
    libraries = _memory_status("VmRSS")
    texts = nq_like_texts(np.random.default_rng(24), n, **W100_LENGTHS)
    fields = {k: v for k, v in MODEL_CONFIGS["tiny-bert"].items() if k != "family"}
    torch.manual_seed(0)
    encoder = DprEncoder(BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **fields), add_pooling_layer=False), INDEX_DIM)
    model_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    token_bytes = int(texts.ids.nbytes + texts.offsets.nbytes + texts.types.nbytes)
    device = pick_device()
    precision = resolve_precision("auto", device)
    folder = _corpus_vectors(work, "fp32").parent
    folder.mkdir(parents=True, exist_ok=True)
    meter.start()
    encoded = encode(encoder, texts, 0, 512, device, precision)
    began = time.perf_counter()
    np.save(_corpus_vectors(work, "fp32"), encoded.embeddings)
    write_fp16(_corpus_vectors(work, "fp16"), encoded.embeddings)
    np.save(folder / "shard-ids.npy", np.arange(n, dtype=np.int64))
    write_s = time.perf_counter() - began
    wall = meter.elapsed()
    return {"wall_s": wall, "disk_bytes": disk_usage(folder), "scale": None,
            "details": {"passages": n, "ran_on": f"{n:,} synthetic 100-word passages, tiny BERT (2 x 64) -> 768", "precision": precision,
                        "encode_s": encoded.encode_s, "write_s": write_s, "passages_per_s": n / encoded.encode_s,
                        "mean_tokens": float(texts.lengths.mean()), "vectors_bytes": n * INDEX_DIM * 4, "model_bytes": model_bytes,
                        "fp32_bytes": disk_usage(_corpus_vectors(work, "fp32")), "fp16_bytes": disk_usage(_corpus_vectors(work, "fp16")),
                        "rss_libraries_bytes": libraries, "token_bytes": token_bytes,
                        # What grows with the shard: its vectors and its token ids; activations are per batch.
                        "rss_per_passage_bytes": INDEX_DIM * 4 + token_bytes / n}}


def write_fp16(path: Path, vectors, block: int = 65536) -> None:
    """The vectors as an fp16 .npy, converted a block at a time (no half-size copy of the whole)."""
    import numpy as np

    with path.open("wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": "<f2", "fortran_order": False, "shape": vectors.shape})
        for start in range(0, len(vectors), block):
            vectors[start : start + block].astype(np.float16).tofile(handle)


def _phase_corpus_search_shard(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """A search-shard task as the stage runs it (`exact_search_streamed`): every question's exact
    inner-product top 100 over the shard's fp32 vectors, read from disk a block at a time (the
    task holds one block and the running top 100, never the shard), then written."""
    import faiss
    import numpy as np

    from dpr_hpc.modeling.searcher import exact_search_streamed

    n, count = int(params["passages"]), int(params["questions"])
    libraries = _memory_status("VmRSS")
    questions = random_unit_vectors(np.random.default_rng(3610), count)
    out = work / "corpus" / "shard-top100.npz"
    meter.start()
    scores, ids = exact_search_streamed(_corpus_vectors(work, "fp32"), questions, TOP_K)
    search_s = meter.elapsed()
    np.savez(out, scores=scores, ids=ids)
    wall = meter.elapsed()
    return {"wall_s": wall, "disk_bytes": disk_usage(out), "scale": None,
            "details": {"passages": n, "questions": count, "ran_on": f"{count:,} questions x {n:,} vectors, exact inner product, streamed in blocks",
                        "search_s": search_s, "vectors_bytes": n * INDEX_DIM * 4, "model_bytes": 0,
                        "rss_libraries_bytes": libraries, "faiss_threads": faiss.omp_get_max_threads(),
                        "rss_per_passage_bytes": 0}}  # one block and the top 100 are held, whatever the shard's size


def _phase_corpus_merge(params: dict[str, Any], work: Path, meter: PhaseTimer) -> dict[str, Any]:
    """The merge job: every question's top-k over all shards by score (merge_top_k), on
    generated per-shard results (each shard's scores sorted best first, ids global)."""
    import numpy as np

    from dpr_hpc.scoring.merge import merge_top_k

    questions, shards, k = int(params["questions"]), int(params["shards"]), int(params["k"])
    rng = np.random.default_rng(50)
    scores = [-np.sort(-rng.standard_normal((questions, k), dtype=np.float32), axis=1) for _ in range(shards)]
    ids = [rng.integers(0, shard_passages(), (questions, k)) + s * shard_passages() for s in range(shards)]
    meter.start()
    merged_scores, merged_ids = merge_top_k(scores, ids, k)
    wall = meter.elapsed()
    if merged_ids.shape != (questions, k):
        raise RuntimeError(f"merge_top_k gave {merged_ids.shape}, expected {(questions, k)}")
    return {"wall_s": wall, "disk_bytes": 0, "scale": None,
            "details": {"questions": questions, "shards": shards, "k": k, "ran_on": f"{questions:,} questions x {shards} shards x top-{k}",
                        "note": "generated scores, at full size: not scaled"}}


CORPUS_PHASES: dict[str, Callable[[dict[str, Any], Path, PhaseTimer], dict[str, Any]]] = {
    "corpus-encode-shard": _phase_corpus_encode_shard,
    "corpus-search-shard": _phase_corpus_search_shard,
    "corpus-merge": _phase_corpus_merge,
}
