"""Encoding many texts fast: length-sorted batches, each padded to its own longest sequence
(rounded up to a multiple of 8), inference mode, mixed precision where the hardware has it, and
embeddings written to disk in shards as they come, so a stopped index job resumes at the last
finished shard. Output rows are in input order whatever order they were computed in.

`encode(..., sort=False, pad_to=256, precision="fp32")` is the paper's way, kept for the
benchmark and for the test that the fast path gives the same vectors.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpr_hpc.fsutil import read_json, write_json_atomic
from dpr_hpc.modeling.batching import TokenizedTexts, pad_batch, rows_of, to_device
from dpr_hpc.modeling.precision import autocast
from dpr_hpc.provenance import node_name

PAD_MULTIPLE = 8
SHARD_ROWS = 65536  # ~200 MB of 768-d float32 embeddings per shard


@dataclass(frozen=True)
class Encoded:
    embeddings: np.ndarray  # float32, one row per input text, in input order
    encode_s: float  # time spent encoding, summed over every job that contributed shards
    reused_shards: int = 0  # shards a previous (stopped) job had already written
    # Every node that encoded some of the rows, in shard order: a requeued index job may have
    # encoded its shards on two nodes, and its PEI then mixes their speeds.
    nodes: tuple[str, ...] = ()


def encode(
    encoder, texts: TokenizedTexts, pad_id: int, batch_size: int, device: torch.device,
    precision: str = "fp32", *, sort: bool = True, pad_to: int | None = None, shard_dir: Path | None = None,
    shard_rows: int = SHARD_ROWS, shard_source: dict | None = None, progress=None, meter=None, before_shard=None,
) -> Encoded:
    """`progress` takes a line per shard for the log; `meter(rows done)` a count per batch,
    returning the seconds it spent (a file write), which the encoding time leaves out.
    `shard_source` (JSON) names what the vectors are made from, such as the upstream record's
    digest and the precision that runs; a shard written from any other source is encoded again.
    `before_shard()` runs before each shard is written, and raises to stop (a lost claim)."""
    encoder.eval()
    order = np.argsort(-texts.lengths, kind="stable") if sort else np.arange(len(texts))
    out = np.empty((len(texts), encoder.embedding_size), dtype=np.float32)
    shards = _ShardFolder(shard_dir, order, encoder.embedding_size, shard_source) if shard_dir is not None else None
    _warm_up(encoder, texts, order, pad_id, device, precision, pad_to)
    encode_s, reused, nodes = 0.0, 0, []
    for number, start in enumerate(range(0, len(order), shard_rows)):
        rows = order[start : start + shard_rows]
        saved = shards.load(number, len(rows)) if shards else None
        if saved is not None:
            out[rows], seconds, node = saved
            encode_s += seconds
            reused += 1
            nodes.append(node)
            if meter:
                meter(start + len(rows))
            continue
        nodes.append(node_name())
        metered = [0.0]  # the meter's file writes inside this shard's loop, left out of its time

        def counted(done: int, start: int = start) -> None:
            metered[0] += meter(start + done) or 0.0

        began = time.perf_counter()
        vectors = _encode_rows(encoder, texts, rows, pad_id, batch_size, device, precision, pad_to, counted if meter else None)
        seconds = time.perf_counter() - began - metered[0]
        encode_s += seconds
        out[rows] = vectors
        if shards:
            if before_shard:
                before_shard()
            shards.save(number, vectors, seconds)
        if progress and len(order) > shard_rows:
            progress(f"encoded {min(start + shard_rows, len(order))}/{len(order)} ({encode_s:.1f}s)")
    return Encoded(out, encode_s, reused, tuple(dict.fromkeys(nodes)))


@torch.inference_mode()
def _encode_rows(encoder, texts, rows, pad_id, batch_size, device, precision, pad_to, counted=None) -> np.ndarray:
    vectors = np.empty((len(rows), encoder.embedding_size), dtype=np.float32)
    with autocast(precision, device):
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows_of(texts, rows[start : start + batch_size]), pad_id, PAD_MULTIPLE, pad_to)
            vectors[start : start + batch_size] = encoder(**to_device(batch, device)).float().cpu().numpy()
            if counted:
                counted(min(start + batch_size, len(rows)))
    return vectors


def warm_up(encoder, texts: TokenizedTexts, pad_id: int, device: torch.device, precision: str, pad_to: int | None = None) -> None:
    """`encode`'s untimed first batch on its own: what compiles an encoder's inference graph
    before the timed encoding (dpr_hpc.modeling.compute)."""
    encoder.eval()
    _warm_up(encoder, texts, np.argsort(-texts.lengths, kind="stable"), pad_id, device, precision, pad_to)


@torch.inference_mode()
def _warm_up(encoder, texts, order, pad_id, device, precision, pad_to) -> None:
    """One small untimed batch first: CUDA context, cuBLAS handles and oneDNN kernels are set
    up on first use, which would otherwise land inside the timed encoding."""
    if len(order) == 0:
        return
    with autocast(precision, device):
        encoder(**to_device(pad_batch(rows_of(texts, order[-8:]), pad_id, PAD_MULTIPLE, pad_to), device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ShardFolder:
    """shard-<n>.npy (embeddings of rows order[n*S:(n+1)*S]) and shard-<n>.json (written after,
    with the encoding time, the node that encoded it, a hash of the row order and the source it
    was made from, so shards of another order or source are ignored)."""

    def __init__(self, folder: Path, order: np.ndarray, dim: int, source: dict | None = None) -> None:
        self.folder = folder
        self.dim = dim
        self.source = source or {}
        self.order_hash = hashlib.sha256(np.ascontiguousarray(order).tobytes()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, number: int, rows: int) -> tuple[np.ndarray, float, str] | None:
        meta_file, data_file = self._paths(number)
        try:
            meta = read_json(meta_file)
            if meta["order"] != self.order_hash or meta["rows"] != rows or meta.get("source", {}) != self.source:
                return None
            vectors = np.load(data_file)
        except (OSError, ValueError, KeyError):
            return None
        return (vectors, float(meta["encode_s"]), str(meta.get("node", "?"))) if vectors.shape == (rows, self.dim) else None

    def save(self, number: int, vectors: np.ndarray, seconds: float) -> None:
        meta_file, data_file = self._paths(number)
        tmp = data_file.with_name(f".{data_file.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, vectors)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, data_file)
        write_json_atomic(meta_file, {"rows": len(vectors), "encode_s": seconds, "order": self.order_hash, "node": node_name(),
                                      "source": self.source})

    def _paths(self, number: int) -> tuple[Path, Path]:
        return self.folder / f"shard-{number:05d}.json", self.folder / f"shard-{number:05d}.npy"
