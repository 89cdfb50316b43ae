"""One tower of the bi-encoder: a Hugging Face backbone, its first-token vector, and an optional
linear projection to the cell's embedding size (the paper's section 3.3), trained jointly.

Every checkpoint is loaded with the class it was saved with, and a weight that did not load is
an error: `AutoModel` maps every `dpr` config to `DPRQuestionEncoder`, so a DPR passage
encoder loaded through it silently got random weights (issue 12).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpr_hpc.errors import CheckpointError
from dpr_hpc.inputs.hub import checkpoint_here, hub_cache_dir

ENCODER_META = "dpr_encoder.json"
PROJECTION_WEIGHTS = "projection.pt"
# Dropout lives under different names per family (BERT/ELECTRA vs DistilBERT).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
# DPR's two encoder classes, by the name `save_pretrained` writes to config.architectures.
DPR_ENCODER_CLASSES = ("DPRQuestionEncoder", "DPRContextEncoder")
# Buffers that recent transformers versions rebuild instead of storing.
_REBUILT_BUFFER = re.compile(r"(^|\.)position_ids$")
_POOLER = re.compile(r"(^|\.)pooler\.")


class DprEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, embedding_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        # DPR's classes return only pooler_output: the first token's vector, through DPR's own
        # projection when its config has projection_dim. Every other family: the first token.
        self.uses_pooler = is_dpr(backbone.config)
        self.native_size = native_size(backbone.config)
        self.embedding_size = embedding_size
        self.projection = nn.Linear(self.native_size, embedding_size) if embedding_size != self.native_size else None
        self._inputs = set(inspect.signature(backbone.forward).parameters)
        self.dynamic_shapes = False  # set by compile_backbone (dpr_hpc.modeling.compute)

    def compile_backbone(self, options: dict) -> None:
        """torch.compile the backbone in place (its weights and state dict keys stay as they
        are, so checkpoints do not change); from now on the batch and sequence dimensions of
        its inputs are marked dynamic, so padding each batch to its own length reuses one graph."""
        self.backbone.compile(options=options)
        self.dynamic_shapes = True

    def uncompile_backbone(self) -> None:
        self.backbone._compiled_call_impl = None  # what nn.Module.compile set
        self.dynamic_shapes = False

    @property
    def projected(self) -> bool:
        return self.projection is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self._inputs:
            inputs["token_type_ids"] = token_type_ids
        if self.dynamic_shapes:
            for tensor in inputs.values():
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        output = self.backbone(**inputs)
        vector = output.pooler_output if self.uses_pooler else output.last_hidden_state[:, 0]
        return self.projection(vector) if self.projection is not None else vector

    @classmethod
    def from_pretrained(cls, name_or_path: str, embedding_size: int, dropout: float | None = None, revision: str | None = None) -> "DprEncoder":
        """A fresh tower from a hub name (at `revision`, a commit) or a folder; reuses a saved
        projection when the folder has one. Raises CheckpointError when a weight did not load."""
        from transformers import AutoConfig

        pinned = _at_revision(revision)
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=hub_cache_dir(), **pinned)
        if dropout is not None:
            for field in DROPOUT_FIELDS:
                if hasattr(config, field):
                    setattr(config, field, dropout)
        encoder = cls(load_backbone(name_or_path, config, **pinned), embedding_size)
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


@dataclass(frozen=True)
class LoadReport:
    """What transformers says about one load, less the weights known to be harmless."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problem(self, name_or_path: str, model_class: str) -> str:
        parts = [f"{label} {', '.join(keys[:8])}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
                 for label, keys in (("missing weights:", self.missing), ("weights it does not use:", self.unexpected),
                                     ("weights of another shape:", self.mismatched)) if keys]
        return f"checkpoint {name_or_path} loaded as {model_class}: {'; '.join(parts)}"


def is_dpr(config) -> bool:
    return getattr(config, "model_type", None) == "dpr"


def backbone_class(config, name_or_path: str):
    """The class a checkpoint was saved with: DPR's question or passage encoder by
    config.architectures (AutoModel would take DPRQuestionEncoder for both), else AutoModel."""
    import transformers

    if not is_dpr(config):
        return transformers.AutoModel
    named = [a for a in (config.architectures or []) if a in DPR_ENCODER_CLASSES]
    if len(named) != 1:
        raise CheckpointError(f"checkpoint {name_or_path}: a DPR config whose architectures {config.architectures} "
                              f"name none (or both) of {', '.join(DPR_ENCODER_CLASSES)}; cannot tell which encoder it is")
    return getattr(transformers, named[0])


def load_backbone(name_or_path: str, config, **kwargs):
    """The backbone with every weight the checkpoint should hold, or CheckpointError naming the
    ones that did not load (a tower with random weights would be evaluated without a word)."""
    model_class = backbone_class(config, name_or_path)
    model, info = model_class.from_pretrained(name_or_path, config=config, output_loading_info=True, cache_dir=hub_cache_dir(), **kwargs)
    report = loading_report(model, info)
    if not report.ok:
        raise CheckpointError(report.problem(name_or_path, type(model).__name__))
    return model


def loading_report(model, info: dict) -> LoadReport:
    """transformers' loading info without the known harmless keys: rebuilt position ids; BERT's
    pooler layer, which no tower here calls (a first-token tower takes the hidden state, and
    DPR's `pooler_output` is its first token through `encode_proj`, its BertModel having no
    pooler), whether the checkpoint lacks it or holds one the model lacks; and weights of a
    pre-training head the backbone does not have (BERT's `cls.*`, DistilBERT's `vocab_*`,
    ELECTRA's `discriminator_predictions.*`), recognised by a first name that is none of the
    model's modules."""
    children = {name for name, _ in model.named_children()}

    def harmless(key: str) -> bool:
        return bool(_REBUILT_BUFFER.search(key) or _POOLER.search(key))

    missing = [k for k in info.get("missing_keys", ()) if not harmless(k)]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not harmless(k) and k.split(".")[0] in children]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
    return LoadReport(tuple(sorted(missing)), tuple(sorted(unexpected)), tuple(sorted(mismatched)))


def check_checkpoint(name_or_path: str) -> bool:
    """Load `name_or_path` as a stage would and raise CheckpointError when a weight does not
    load, so that a broken checkpoint is caught when the grid is planned, not after the queue
    wait. Hub names not in the local Hugging Face cache are skipped (returns False): whether
    they can be fetched is `plan`'s other check, not this one."""
    if not checkpoint_here(name_or_path):
        return False
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, cache_dir=hub_cache_dir())
    load_backbone(name_or_path, config, local_files_only=True)
    return True


def native_size(config) -> int:
    """The width of the first-token vector: hidden size, or DPR's own projection_dim when set."""
    return int(getattr(config, "projection_dim", 0) or config.hidden_size)


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, cache_dir=hub_cache_dir(), **_at_revision(revision))


def _at_revision(revision: str | None) -> dict[str, str]:
    """from_pretrained's revision argument, left out for a folder (or a hub model not pinned)."""
    return {"revision": revision} if revision else {}
