"""One tower of the bi-encoder: a Hugging Face backbone, its first-token vector, and an optional
linear projection to the cell's embedding size (the paper's section 3.3), trained jointly."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

ENCODER_META = "dpr_encoder.json"
PROJECTION_WEIGHTS = "projection.pt"
# Dropout lives under different names per family (BERT/ELECTRA vs DistilBERT).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


class DprEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, embedding_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.native_size = native_size(backbone.config)
        self.embedding_size = embedding_size
        self.projection = nn.Linear(self.native_size, embedding_size) if embedding_size != self.native_size else None
        self._inputs = set(inspect.signature(backbone.forward).parameters)

    @property
    def projected(self) -> bool:
        return self.projection is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self._inputs:
            inputs["token_type_ids"] = token_type_ids
        output = self.backbone(**inputs)
        # DPR's released encoders expose only pooler_output, which is their first-token vector.
        hidden = getattr(output, "last_hidden_state", None)
        vector = hidden[:, 0] if hidden is not None else output.pooler_output
        return self.projection(vector) if self.projection is not None else vector

    @classmethod
    def from_pretrained(cls, name_or_path: str, embedding_size: int, dropout: float | None = None) -> "DprEncoder":
        """A fresh tower from a hub name or a folder; reuses a saved projection when the folder has one."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(name_or_path)
        if dropout is not None:
            for field in DROPOUT_FIELDS:
                if hasattr(config, field):
                    setattr(config, field, dropout)
        encoder = cls(AutoModel.from_pretrained(name_or_path, config=config), embedding_size)
        meta = Path(name_or_path) / ENCODER_META
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved["embedding_size"] != embedding_size:
                raise ValueError(f"{name_or_path} was trained for embedding size {saved['embedding_size']}, not {embedding_size}")
            if encoder.projection is not None:
                encoder.projection.load_state_dict(torch.load(Path(name_or_path) / PROJECTION_WEIGHTS, weights_only=True))
        return encoder

    def save(self, folder: Path, tokenizer=None) -> None:
        """Hugging Face format plus the projection, so `from_pretrained(folder, size)` restores it."""
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if self.projection is not None:
            torch.save(self.projection.state_dict(), folder / PROJECTION_WEIGHTS)
        meta = {"embedding_size": self.embedding_size, "native_size": self.native_size, "projection": self.projected}
        (folder / ENCODER_META).write_text(json.dumps(meta, indent=2) + "\n")


def native_size(config) -> int:
    """The width of the first-token vector: hidden size, or DPR's own projection_dim when set."""
    return int(getattr(config, "projection_dim", 0) or config.hidden_size)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
