"""The bi-encoder's pieces: DPR's loss, the projection, padding, and the saved checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpr_hpc.data import Passage
from dpr_hpc.modeling.batching import encode, pad_batch, tokenize_passages, tokenize_questions
from dpr_hpc.modeling.encoder import DprEncoder, load_tokenizer
from dpr_hpc.modeling.loss import dpr_nll_loss


def test_loss_is_nll_of_each_positive_against_every_batch_passage():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # positives, then negatives
    scores = q @ p.T
    expected = -(torch.log_softmax(scores, 1)[0, 0] + torch.log_softmax(scores, 1)[1, 1]) / 2
    assert dpr_nll_loss(q, p).item() == pytest.approx(expected.item())
    uniform = torch.zeros(3, 4), torch.zeros(6, 4)
    assert dpr_nll_loss(*uniform).item() == pytest.approx(math.log(6))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-distilbert", "tiny-tinybert", "tiny-electra"])
def test_every_family_gives_first_token_vectors_projected_only_when_sizes_differ(demo_assets, model):
    folder = str(demo_assets / "models" / model)
    native = DprEncoder.from_pretrained(folder, embedding_size=DprEncoder.from_pretrained(folder, 1).native_size)
    projected = DprEncoder.from_pretrained(folder, embedding_size=24)
    assert not native.projected and projected.projected
    tokenizer = load_tokenizer(folder)
    batch = pad_batch(tokenize_questions(tokenizer, ["what is the capital?", "who?"], 32), tokenizer.pad_token_id)
    assert projected.eval()(**batch).shape == (2, 24)
    assert native.eval()(**batch).shape == (2, native.native_size)


def test_electra_demo_model_keeps_embedding_size_below_hidden_size(demo_assets):
    encoder = DprEncoder.from_pretrained(str(demo_assets / "models" / "tiny-electra"), 64)
    config = encoder.backbone.config
    assert config.embedding_size < config.hidden_size


def test_saved_encoder_reloads_with_its_projection(demo_assets, tmp_path):
    folder = str(demo_assets / "models" / "tiny-bert")
    encoder = DprEncoder.from_pretrained(folder, embedding_size=24).eval()
    tokenizer = load_tokenizer(folder)
    encoder.save(tmp_path / "enc", tokenizer)
    again = DprEncoder.from_pretrained(str(tmp_path / "enc"), embedding_size=24).eval()
    batch = pad_batch(tokenize_questions(tokenizer, ["a question"], 32), tokenizer.pad_token_id)
    assert torch.equal(encoder(**batch), again(**batch))
    with pytest.raises(ValueError, match="embedding size 24"):
        DprEncoder.from_pretrained(str(tmp_path / "enc"), embedding_size=32)


def test_dynamic_padding_gives_the_same_vectors_in_input_order(demo_assets):
    folder = str(demo_assets / "models" / "tiny-bert")
    encoder = DprEncoder.from_pretrained(folder, embedding_size=64)
    tokenizer = load_tokenizer(folder)
    passages = [Passage(str(i), f"title {i}", "word " * (3 + 7 * i)) for i in range(5)]
    features = tokenize_passages(tokenizer, passages, 64, embed_title=True)
    batched = encode(encoder, features, tokenizer.pad_token_id, batch_size=2, device=torch.device("cpu"))
    one_by_one = [encode(encoder, [f], tokenizer.pad_token_id, batch_size=1, device=torch.device("cpu"))[0] for f in features]
    assert np.allclose(batched, np.stack(one_by_one), atol=1e-5)
