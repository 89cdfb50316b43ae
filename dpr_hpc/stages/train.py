"""Train stage: fine-tune the question and passage towers with DPR's loss and save both.

The training is resumable at any step boundary. Its checkpoints (dpr_hpc.resume.checkpoints) hold
everything the next step depends on: both towers with their projections, optimizer, LR schedule,
every RNG, this epoch's shuffled order and the next batch in it, the per-step losses and the
segments so far. A resumed run therefore takes exactly the steps an uninterrupted one takes.

TTT (the paper's total training time) is the sum of the segments' optimisation time only:
tokenization, model loading, checkpoint writes, queue waits and restarts are timed apart.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dpr_hpc.fsutil import atomic_folder, read_json, write_json_atomic
from dpr_hpc.grid import CellConfig
from dpr_hpc.tracking.progress import Meter
from dpr_hpc.modeling.batching import pad_batch, rows_of, to_device, tokenize_passages, tokenize_questions
from dpr_hpc.modeling.compute import (TRAIN_COMPILE_GAIN, adamw, attention_implementation, compile_encoders, encoder_flops_per_token,
                                      expected_eager_s)
from dpr_hpc.modeling.batch_probe import CPU_FALLBACK, MAX_BATCH, gpu_step_probe, largest_fitting_power_of_two
from dpr_hpc.modeling.device import peak_memory, pick_device, synchronize
from dpr_hpc.modeling.encoding import PAD_MULTIPLE
from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer
from dpr_hpc.modeling.precision import autocast, grad_scaler, resolve_precision
from dpr_hpc.modeling.train_step import backward_batch, clip_and_step, linear_schedule
from dpr_hpc.inputs.prepared import PreparedTrain, load_train
from dpr_hpc.provenance import now_iso
from dpr_hpc.resume.rng import capture_rng, restore_rng
from dpr_hpc.resume.segments import FINISHED, Segment, SegmentLog
from dpr_hpc.resume.signals import NeverStop, Stopper, TrainingInterrupted, wait_while_held
from dpr_hpc.resume.checkpoints import CheckpointStore
from dpr_hpc.errors import CheckpointWriteError
from dpr_hpc.stages.common import StageIO, StageOutput, prepared_details, progress, seed_everything, tokenized

# What the record lists (a folder stands for every file in it) and index and infer read.
ARTIFACTS = ["checkpoint", "losses.json"]
CHECKPOINT_FORMAT = 2


@dataclass
class Position:
    """Where the training stands: what a checkpoint holds besides weights and RNG states."""

    epoch: int = 0
    next_batch: int = 0
    order: list[int] | None = None  # this epoch's shuffled example order, once drawn
    step: int = 0
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def train(cell: CellConfig, io: StageIO, repeat: int = 0, stop: Stopper | None = None) -> StageOutput:
    cfg = cell.train
    if cfg is None:
        raise ValueError(f"cell {cell.cell_id} is evaluation-only and has no train stage")
    stop = stop or NeverStop()
    paths = io.out
    seed_everything(cfg.seed)
    device = pick_device()
    question_source, passage_source = cell.model_path(cell.question_encoder), cell.model_path(cell.passage_encoder)
    question_encoder = DprEncoder.from_pretrained(question_source, cell.embedding_size, cfg.dropout, io.revision(question_source))
    passage_encoder = DprEncoder.from_pretrained(passage_source, cell.embedding_size, cfg.dropout, io.revision(passage_source))
    question_tokenizer = load_tokenizer(question_source, io.revision(question_source))
    passage_tokenizer = load_tokenizer(passage_source, io.revision(passage_source))

    examples = load_train(cell.data_path("train"), io.prepared_cache)
    progress(f"training data: {len(examples)} examples, {'mapped' if examples.hit else 'prepared'} in {examples.load_s:.2f}s")
    if not len(examples):
        raise ValueError(f"{cell.data_path('train')}: no question has a positive passage")
    started = time.perf_counter()
    batches = _TokenizedExamples(examples, question_tokenizer, passage_tokenizer, cell, io)
    tokenize_s = time.perf_counter() - started

    question_encoder.to(device).train()
    passage_encoder.to(device).train()
    precision = resolve_precision(cell.precision.train, device)
    batch_size, batch_choice = _batch_size(cell, paths.batch_size, question_encoder, passage_encoder, question_tokenizer, device, precision, len(examples))
    parameters = list(question_encoder.parameters()) + list(passage_encoder.parameters())
    # Decay on every parameter, biases and LayerNorm too, as the paper's AdamW(model.parameters()).
    optimizer, optimizer_impl = adamw(parameters, cfg.learning_rate, cfg.weight_decay, device)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = linear_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.lr_floor)
    scaler = grad_scaler(precision, device)
    chunk_size = cell.grad_cache.chunk_size
    order_generator = torch.Generator().manual_seed(cfg.seed)
    position, segments = Position(), SegmentLog()

    store = CheckpointStore(paths.resume, warn=progress, before_write=io.check_claim)
    modules = {"question_encoder": question_encoder, "passage_encoder": passage_encoder, "optimizer": optimizer, "scheduler": scheduler}
    if scaler is not None:
        modules["scaler"] = scaler
    loaded = store.load_latest(map_location=device)
    if loaded is not None:
        _check_belongs(loaded.state, io.job.key, loaded.path)
        for name, module in modules.items():
            module.load_state_dict(loaded.state[name])
        order_generator.set_state(loaded.state["order_generator"])
        restore_rng(loaded.state["rng"])
        position = Position(**loaded.state["position"])
        segments = SegmentLog.from_json(loaded.state["segments"])
        segments.current.checkpoint_s += loaded.write_s
        progress(f"resuming from {loaded.path.name}: epoch {position.epoch + 1}/{cfg.epochs}, step {position.step}/{total_steps}, {len(segments.segments)} earlier segment(s)")
    compiled = _compile_towers(cell, question_encoder, passage_encoder, batches, batch_size, total_steps - position.step,
                               position.epoch, device, precision, lambda: optimizer.zero_grad(set_to_none=True))
    segments.segments.append(Segment.start(position.step, torch.cuda.get_device_name(device) if device.type == "cuda" else None))
    segment = segments.current

    def save_checkpoint(ended_by: str) -> str:
        segment.ended_by, segment.ended_at = ended_by, now_iso()
        began = time.perf_counter()
        state = {
            "format": CHECKPOINT_FORMAT, "key": io.job.key,
            **{name: module.state_dict() for name, module in modules.items()},
            "order_generator": order_generator.get_state(), "rng": capture_rng(),
            "position": asdict(position), "segments": segments.to_json(),
        }
        try:
            path = store.save(position.step, state)
        finally:
            segment.checkpoint_s += time.perf_counter() - began
        _write_progress(paths.progress, position, cfg.epochs, steps_per_epoch, segments, path.name)
        return path.name

    every_steps, every_s = cell.checkpoint.every_steps, cell.checkpoint.every_minutes * 60.0
    _write_progress(paths.progress, position, cfg.epochs, steps_per_epoch, segments, loaded.path.name if loaded else None)
    synchronize(device)
    clock = time.perf_counter()
    last_checkpoint = clock

    def bank_time() -> None:
        """Move the optimisation time since `clock` into the segment (before any checkpoint)."""
        nonlocal clock
        synchronize(device)
        now = time.perf_counter()
        segment.train_s += now - clock
        clock = now

    meter = Meter(paths.meter, "training", "steps", total_steps, position.step, before_write=io.check_claim)
    while position.epoch < cfg.epochs:
        if position.order is None:
            position.order = torch.randperm(len(examples), generator=order_generator).tolist()
            position.next_batch = 0
        while position.next_batch < steps_per_epoch:
            rows = position.order[position.next_batch * batch_size : (position.next_batch + 1) * batch_size]
            question_batches, passage_batches = batches.chunks(rows, chunk_size, device, position.epoch)
            loss = backward_batch(question_encoder, passage_encoder, question_batches, passage_batches, bool(chunk_size), precision, device, scaler)
            clip_and_step(parameters, optimizer, scaler, cfg.max_grad_norm)
            scheduler.step()
            position.step_losses.append(loss.item())
            position.step += 1
            position.next_batch += 1
            segment.steps += 1
            clock += meter.update(position.step)  # the meter's file write is not training time
            if position.next_batch == steps_per_epoch:
                position.epoch_losses.append(sum(position.step_losses[-steps_per_epoch:]) / steps_per_epoch)
                position.epoch += 1
                position.order = None
                bank_time()
                progress(f"epoch {position.epoch}/{cfg.epochs}  loss {position.epoch_losses[-1]:.4f}  {segments.train_s:.1f}s")
                if position.epoch == cfg.epochs:
                    break
            wait_while_held(stop)
            if stop.requested():
                bank_time()
                try:
                    name = save_checkpoint(stop.reason)
                except OSError as exc:
                    raise CheckpointWriteError(
                        f"the checkpoint at the stop signal ({stop.reason}, step {position.step}) was not written: {exc}; "
                        "submitting again resumes from the last checkpoint written") from exc
                raise TrainingInterrupted(stop.reason, position.step, name)
            now = time.perf_counter()
            if (every_steps and position.step % every_steps == 0) or now - last_checkpoint >= every_s:
                bank_time()
                try:
                    save_checkpoint("running")
                except OSError as exc:  # e.g. a full disk: the previous checkpoint still stands
                    progress(f"warning: periodic checkpoint at step {position.step} not written ({exc}); training goes on")
                clock = last_checkpoint = time.perf_counter()
    bank_time()
    segment.ended_by, segment.ended_at = FINISHED, now_iso()

    io.check_claim()
    try:
        for encoder, folder, tokenizer in ((question_encoder, paths.question_encoder, question_tokenizer),
                                           (passage_encoder, paths.passage_encoder, passage_tokenizer)):
            with atomic_folder(folder) as building:
                encoder.save(building, tokenizer)
        write_json_atomic(paths.losses, {"step_losses": position.step_losses, "epoch_losses": position.epoch_losses})
    except OSError as exc:
        raise CheckpointWriteError(f"the trained encoders were not saved: {exc}; submitting again resumes from the last checkpoint") from exc
    _write_progress(paths.progress, position, cfg.epochs, steps_per_epoch, segments, None)
    return StageOutput(
        metrics={"epoch_loss": position.epoch_losses, "final_loss": position.epoch_losses[-1], "steps": total_steps, "num_examples": len(examples)},
        timings={
            "ttt_s": segments.train_s,
            "tokenize_s": tokenize_s,
            "checkpoint_s": sum(s.checkpoint_s for s in segments.segments),
            "meter_write_s": meter.write_s,  # left out of ttt_s (this job's segment's writes)
            **peak_memory(device),
        },
        artifacts=ARTIFACTS,
        details={
            "projection": question_encoder.projected,
            "native_size": question_encoder.native_size,
            "device": device.type,
            "examples_without_negative": batches.without_negative,
            "prepared_data": prepared_details(examples),
            "hard_negative": cfg.hard_negative,
            "padding": cell.text.padding,
            "pad_to": cell.text.pad_to,
            "precision": precision,
            "precision_requested": cell.precision.train,
            "grad_scaler": scaler is not None,
            "tokens_cached": batches.cache_hits == 3,
            "batch_size": batch_size,
            "batch_size_choice": batch_choice,
            "grad_cache": {"chunk_size": chunk_size} if chunk_size else None,
            # This job's compute (a resumed training's earlier segments may have run another).
            "compute": {"compile": compiled.to_json(), "attention": attention_implementation(question_encoder),
                        "passage_attention": attention_implementation(passage_encoder), "optimizer": f"adamw ({optimizer_impl})"},
            "restarts": segments.restarts,
            "segments": segments.to_json(),
        },
        discard=[paths.resume],
    )


def _compile_towers(cell: CellConfig, question_encoder, passage_encoder, batches: "_TokenizedExamples", batch_size: int, steps_left: int,
                    epoch: int, device, precision: str, clear_gradients):
    """Compile both towers where `compute.compile` says so, and compile every graph the
    training uses now, on one untimed batch whose gradients and random draws are then thrown
    away: the training's steps, losses and resume points are those of an uncompiled run."""
    chunk_size = cell.grad_cache.chunk_size
    lengths = [batches.questions.texts.lengths, batches.positives.texts.lengths, batches.negatives.texts.lengths]
    tokens_per_step = batch_size * sum(float(x.mean()) if len(x) else 0.0 for x in lengths)
    passes = 3 + (1 if chunk_size else 0)  # forward and backward (twice the forward), and the gradient cache's first pass
    eager_s = expected_eager_s(steps_left * tokens_per_step * encoder_flops_per_token(question_encoder) * passes, device)

    def warm_up() -> None:
        rng = capture_rng()
        rows = list(range(min(batch_size, len(batches.questions.texts))))
        question_batches, passage_batches = batches.chunks(rows, chunk_size, device, epoch)
        backward_batch(question_encoder, passage_encoder, question_batches, passage_batches, bool(chunk_size), precision, device, None)
        clear_gradients()
        restore_rng(rng)

    return compile_encoders([question_encoder, passage_encoder], cell.compute.compile, eager_s, 3 if chunk_size else 2, warm_up, progress,
                            TRAIN_COMPILE_GAIN)


def _batch_size(cell: CellConfig, chosen_file, question_encoder, passage_encoder, tokenizer, device, precision: str, examples: int) -> tuple[int, dict[str, Any]]:
    """The grid's batch size, or for `auto` the probe's answer, decided once per training: a
    resumed run reads it back, so it keeps its batch size on a node with another GPU."""
    requested = cell.train.batch_size
    if requested != "auto":
        return int(requested), {"batch_size": requested, "source": "grid"}
    if chosen_file.is_file():
        chosen = read_json(chosen_file)
        return int(chosen["batch_size"]), chosen
    if device.type != "cuda":
        chosen = {"batch_size": CPU_FALLBACK, "source": f"auto: no GPU to probe, the paper's BERT batch size {CPU_FALLBACK}"}
    else:
        rng = capture_rng()  # the probe's dropout must not shift the training's random stream
        probe = gpu_step_probe(question_encoder, passage_encoder, cell.text.max_length, len(tokenizer), device,
                               lambda: autocast(precision, device), "token_type_ids" in tokenizer.model_input_names)
        size, probes = largest_fitting_power_of_two(probe, min(examples, MAX_BATCH), log=progress)
        restore_rng(rng)
        props = torch.cuda.get_device_properties(device)
        chosen = {"batch_size": size, "source": "auto: largest power of 2 that fits", "probes": probes,
                  "gpu_name": props.name, "gpu_total_gb": round(props.total_memory / 2**30, 1), "max_length": cell.text.max_length}
    progress(f"batch size: {chosen['batch_size']} ({chosen['source']})")
    write_json_atomic(chosen_file, chosen)
    return int(chosen["batch_size"]), chosen


def _check_belongs(state: dict[str, Any], key: str, path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
        raise ValueError(f"{path}: checkpoint of another training (format {state.get('format')}, key {state.get('key')}); delete it to start over")


def _write_progress(path, position: Position, epochs: int, steps_per_epoch: int, segments: SegmentLog, checkpoint: str | None) -> None:
    """What `dpr-hpc status` shows of a training that is running or waiting to resume."""
    write_json_atomic(path, {
        "epoch": min(position.epoch + 1, epochs), "epochs": epochs,
        "step": position.step, "total_steps": epochs * steps_per_epoch,
        "restarts": segments.restarts, "train_s": round(segments.train_s, 3),
        "last_checkpoint": checkpoint, "updated_at": now_iso(),
    })


def epoch_negatives(pool_sizes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """`hard_negative: shuffle`: which of its negatives each example trains with in `epoch`, as
    an offset into its pool (DPR shuffles each example's hard negatives every epoch and takes
    the first, i.e. a uniform draw). Drawn from a generator seeded by the seed and the epoch
    alone, so a resumed training draws the same without storing anything; 0 for an empty pool."""
    digest = hashlib.sha256(f"hard-negatives/{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    draws = torch.rand(len(pool_sizes), generator=generator, dtype=torch.float64).numpy()
    return np.minimum((draws * pool_sizes).astype(np.int64), np.maximum(pool_sizes - 1, 0))


class _TokenizedExamples:
    """Examples tokenized once (through the grid's token cache); a batch is their rows, padded
    to its longest sequence rounded up to a multiple of 8 (or every row to text.max_length, with
    `text.padding: max_length`, the paper's). With `hard_negative: first` only each
    example's first negative is tokenized; with `shuffle` its whole pool."""

    def __init__(self, examples: PreparedTrain, question_tokenizer, passage_tokenizer, cell: CellConfig, io: StageIO) -> None:
        text = cell.text
        self.shuffle, self.seed = cell.train.hard_negative == "shuffle", cell.train.seed
        counts = examples.negative_counts
        self.pool_sizes = counts.astype(np.int64) if self.shuffle else np.minimum(counts, 1).astype(np.int64)
        self.pool_starts = np.concatenate(([0], np.cumsum(self.pool_sizes)[:-1])).astype(np.int64)
        # Every example's whole pool, or each one's first negative; read from the mapped columns.
        flat_pool = examples.negatives if self.shuffle else examples.negatives.take(examples.negative_offsets[:-1][counts > 0])

        def passages(items):
            return lambda: tokenize_passages(passage_tokenizer, items, text.max_length, text.embed_title, text.passage_format)

        self.questions = tokenized(io, cell, "train-questions", examples, question_tokenizer,
                                   lambda: tokenize_questions(question_tokenizer, examples.questions, text.max_length))
        self.positives = tokenized(io, cell, "train-positives", examples, passage_tokenizer, passages(examples.positives))
        self.negatives = tokenized(io, cell, "train-negative-pools" if self.shuffle else "train-negatives", examples, passage_tokenizer,
                                   passages(flat_pool))
        self.without_negative = int((self.pool_sizes == 0).sum())
        self.cache_hits = sum(t.hit for t in (self.questions, self.positives, self.negatives))
        self.question_pad = question_tokenizer.pad_token_id
        self.passage_pad = passage_tokenizer.pad_token_id
        self.pad_to = text.pad_to
        self._epoch_rows: tuple[int, np.ndarray] | None = None

    def negative_rows(self, epoch: int) -> np.ndarray:
        """Each example's negative in `epoch` as a row of `self.negatives`, -1 where it has none."""
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            offsets = epoch_negatives(self.pool_sizes, self.seed, epoch) if self.shuffle else np.zeros_like(self.pool_sizes)
            self._epoch_rows = (epoch, np.where(self.pool_sizes > 0, self.pool_starts + offsets, -1))
        return self._epoch_rows[1]

    def chunks(self, rows: list[int], chunk_size: int, device: torch.device, epoch: int) -> tuple[list[dict], list[dict]]:
        """The batch's questions, and its passages (the B positives first, then this epoch's
        hard negatives), in chunks of `chunk_size` (0: one chunk each, the whole batch), each
        chunk padded to its own longest sequence or to `pad_to`."""
        negative_rows = self.negative_rows(epoch)
        negatives = [int(negative_rows[i]) for i in rows if negative_rows[i] >= 0]
        questions = rows_of(self.questions.texts, rows)
        passages = rows_of(self.positives.texts, rows) + rows_of(self.negatives.texts, negatives)
        return self._padded_chunks(questions, chunk_size, self.question_pad, device), self._padded_chunks(passages, chunk_size, self.passage_pad, device)

    def _padded_chunks(self, sequences, chunk_size: int, pad_id: int, device: torch.device) -> list[dict]:
        size = chunk_size or len(sequences)
        return [to_device(pad_batch(sequences[i : i + size], pad_id, PAD_MULTIPLE, self.pad_to), device) for i in range(0, len(sequences), size)]
