"""The bi-encoder's pieces: DPR's loss, the projection, padding, and the saved checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpr_hpc.data import Passage
from dpr_hpc.modeling.batching import pad_batch, rows_of, tokenize_passages, tokenize_questions
from dpr_hpc.modeling.encoding import encode
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
    texts = tokenize_questions(tokenizer, ["what is the capital?", "who?"], 32)
    batch = pad_batch(rows_of(texts, range(2)), tokenizer.pad_token_id)
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
    batch = pad_batch(rows_of(tokenize_questions(tokenizer, ["a question"], 32), [0]), tokenizer.pad_token_id)
    assert torch.equal(encoder(**batch), again(**batch))
    with pytest.raises(ValueError, match="embedding size 24"):
        DprEncoder.from_pretrained(str(tmp_path / "enc"), embedding_size=32)


def test_fast_encoding_matches_the_papers_padded_fp32_way_in_input_order(demo_assets, tmp_path):
    """Length-sorted, dynamically padded (to a multiple of 8), sharded encoding against every
    text padded to the model's full length in input order: the same vectors in the same rows,
    within 1e-5 (fp32 sums over different padding lengths round differently)."""
    folder = str(demo_assets / "models" / "tiny-bert")
    encoder = DprEncoder.from_pretrained(folder, embedding_size=64)
    tokenizer = load_tokenizer(folder)
    passages = [Passage(str(i), f"title {i}", "word " * (3 + (7 * i) % 50)) for i in range(23)]
    texts = tokenize_passages(tokenizer, passages, 64, embed_title=True)
    cpu = torch.device("cpu")
    fast = encode(encoder, texts, tokenizer.pad_token_id, batch_size=4, device=cpu, shard_dir=tmp_path / "shards", shard_rows=5)
    plain = encode(encoder, texts, tokenizer.pad_token_id, batch_size=512, device=cpu, sort=False, pad_to=128)
    assert fast.embeddings.shape == (23, 64)
    assert np.abs(fast.embeddings - plain.embeddings).max() < 1e-5
    assert len(list((tmp_path / "shards").glob("shard-*.npy"))) == 5


def test_index_encoding_resumes_from_finished_shards(demo_assets, tmp_path, monkeypatch):
    folder = str(demo_assets / "models" / "tiny-bert")
    encoder = DprEncoder.from_pretrained(folder, embedding_size=64)
    tokenizer = load_tokenizer(folder)
    texts = tokenize_passages(tokenizer, [Passage(str(i), "t", "word " * (1 + i)) for i in range(12)], 64, embed_title=True)
    cpu = torch.device("cpu")
    monkeypatch.setenv("SLURMD_NODENAME", "node-a")
    first = encode(encoder, texts, tokenizer.pad_token_id, 4, cpu, shard_dir=tmp_path / "shards", shard_rows=4)
    (tmp_path / "shards" / "shard-00002.json").unlink()  # as if the job stopped while writing shard 2
    monkeypatch.setenv("SLURMD_NODENAME", "node-b")  # requeued onto another node
    again = encode(encoder, texts, tokenizer.pad_token_id, 4, cpu, shard_dir=tmp_path / "shards", shard_rows=4)
    assert again.reused_shards == 2
    assert np.array_equal(first.embeddings, again.embeddings)
    assert (first.nodes, again.nodes) == (("node-a",), ("node-a", "node-b"))
