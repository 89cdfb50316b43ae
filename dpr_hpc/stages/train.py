"""Train stage: fine-tune the question and passage towers with DPR's loss and save both.

TTT (the paper's total training time) covers the optimisation steps only: tokenization, model
loading and checkpoint saving are timed apart.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import get_linear_schedule_with_warmup

from dpr_hpc.data import TrainingExample, read_records, training_examples
from dpr_hpc.grid import CellConfig
from dpr_hpc.layout import RunLayout
from dpr_hpc.modeling.batching import Features, pad_batch, to_device, tokenize_passages, tokenize_questions
from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer
from dpr_hpc.modeling.loss import dpr_nll_loss
from dpr_hpc.stages.common import StageOutput, peak_memory, pick_device, progress, seed_everything, synchronize

CHECKPOINT_MARKERS = ["checkpoint/question_encoder/dpr_encoder.json", "checkpoint/passage_encoder/dpr_encoder.json"]


def train(cell: CellConfig, run: RunLayout, repeat: int = 0) -> StageOutput:
    cfg = cell.train
    if cfg is None:
        raise ValueError(f"cell {cell.cell_id} is evaluation-only and has no train stage")
    seed_everything(cfg.seed)
    device = pick_device()
    question_encoder = DprEncoder.from_pretrained(cell.model_path(cell.question_encoder), cell.embedding_size, cfg.dropout)
    passage_encoder = DprEncoder.from_pretrained(cell.model_path(cell.passage_encoder), cell.embedding_size, cfg.dropout)
    question_tokenizer = load_tokenizer(cell.model_path(cell.question_encoder))
    passage_tokenizer = load_tokenizer(cell.model_path(cell.passage_encoder))

    examples = training_examples(read_records(cell.data_path("train")), source=str(cell.data_path("train")))
    if not examples:
        raise ValueError(f"{cell.data_path('train')}: no question has a positive passage")
    started = time.perf_counter()
    batches = _TokenizedExamples(examples, question_tokenizer, passage_tokenizer, cell)
    tokenize_s = time.perf_counter() - started

    question_encoder.to(device).train()
    passage_encoder.to(device).train()
    parameters = list(question_encoder.parameters()) + list(passage_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    order_generator = torch.Generator().manual_seed(cfg.seed)

    epoch_losses: list[float] = []
    synchronize(device)
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(examples), generator=order_generator).tolist()
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            questions, passages = batches.batch(rows, device)
            loss = dpr_nll_loss(question_encoder(**questions), passage_encoder(**passages))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item()
        epoch_losses.append(loss_sum / steps_per_epoch)
        progress(f"epoch {epoch + 1}/{cfg.epochs}  loss {epoch_losses[-1]:.4f}  {time.perf_counter() - started:.1f}s")
    synchronize(device)
    ttt_s = time.perf_counter() - started

    question_encoder.save(run.question_encoder_dir(cell.cell_id), question_tokenizer)
    passage_encoder.save(run.passage_encoder_dir(cell.cell_id), passage_tokenizer)
    return StageOutput(
        metrics={"epoch_loss": epoch_losses, "final_loss": epoch_losses[-1], "steps": total_steps, "num_examples": len(examples)},
        timings={"ttt_s": ttt_s, "tokenize_s": tokenize_s, **peak_memory(device)},
        artifacts=CHECKPOINT_MARKERS,
        details={
            "projection": question_encoder.projected,
            "native_size": question_encoder.native_size,
            "device": device.type,
            "examples_without_negative": batches.without_negative,
        },
    )


class _TokenizedExamples:
    """Examples tokenized once up front; a batch is their rows, padded to its longest sequence."""

    def __init__(self, examples: list[TrainingExample], question_tokenizer, passage_tokenizer, cell: CellConfig) -> None:
        max_length, titles = cell.text.max_length, cell.text.embed_title
        self.questions: Features = tokenize_questions(question_tokenizer, [e.question for e in examples], max_length)
        self.positives: Features = tokenize_passages(passage_tokenizer, [e.positive for e in examples], max_length, titles)
        with_negative = [i for i, e in enumerate(examples) if e.negative is not None]
        negatives = tokenize_passages(passage_tokenizer, [examples[i].negative for i in with_negative], max_length, titles)
        self.negatives: dict[int, dict[str, list[int]]] = dict(zip(with_negative, negatives))
        self.without_negative = len(examples) - len(with_negative)
        self.question_pad = question_tokenizer.pad_token_id
        self.passage_pad = passage_tokenizer.pad_token_id

    def batch(self, rows: list[int], device: torch.device) -> tuple[dict, dict]:
        """Questions, and passages with the B positives first and then the hard negatives."""
        passages = [self.positives[i] for i in rows] + [self.negatives[i] for i in rows if i in self.negatives]
        questions = pad_batch([self.questions[i] for i in rows], self.question_pad)
        return to_device(questions, device), to_device(pad_batch(passages, self.passage_pad), device)

