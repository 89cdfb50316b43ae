"""The bi-encoder's pieces: DPR's loss, the projection, padding, and the saved checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpr_hpc.inputs.data import Passage
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


def test_shards_made_from_another_upstream_record_or_precision_are_encoded_again(demo_assets, tmp_path):
    """A stopped index job's shards are kept only for the same trained weights (their record's
    digest) and the precision that ran: a training rerun under the same key, or a node that
    resolves the precision otherwise, encodes every shard anew."""
    folder = str(demo_assets / "models" / "tiny-bert")
    encoder = DprEncoder.from_pretrained(folder, embedding_size=64)
    tokenizer = load_tokenizer(folder)
    texts = tokenize_passages(tokenizer, [Passage(str(i), "t", "word " * (1 + i)) for i in range(12)], 64, embed_title=True)
    cpu = torch.device("cpu")
    made_from = {"upstream": {"train/k/r0": "digest-1"}, "precision": "fp32"}

    def again(source: dict) -> int:
        return encode(encoder, texts, tokenizer.pad_token_id, 4, cpu, shard_dir=tmp_path / "shards", shard_rows=4, shard_source=source).reused_shards

    assert again(made_from) == 0  # the first job writes 3 shards
    assert again(made_from) == 3
    assert again({**made_from, "upstream": {"train/k/r0": "digest-2"}}) == 0  # retrained: every shard again
    assert again({"upstream": {"train/k/r0": "digest-2"}, "precision": "bf16"}) == 0
    assert again({"upstream": {"train/k/r0": "digest-2"}, "precision": "bf16"}) == 3


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A BERT tokenizer that emits segment ids (type 1 for the second of a pair)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "the", "capital", "of", "france", "is"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def _ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def test_paper_format_is_title_space_text_as_one_segment(bert_tokenizer):
    texts = tokenize_passages(bert_tokenizer, [Passage("1", "Paris", "the capital of France")], 64, embed_title=True, passage_format="paper")
    ids, types = texts.sequence(0)
    assert ids.tolist() == _ids(bert_tokenizer, "[CLS] paris the capital of france [SEP]")
    assert types.tolist() == [0] * len(ids)


def test_dpr_format_is_title_sep_text_with_all_zero_segments(bert_tokenizer):
    passage = Passage("1", "Paris", "the capital of France")
    texts = tokenize_passages(bert_tokenizer, [passage], 64, embed_title=True, passage_format="dpr")
    ids, types = texts.sequence(0)
    assert ids.tolist() == _ids(bert_tokenizer, "[CLS] paris [SEP] the capital of france [SEP]")
    assert bert_tokenizer("Paris", "the capital of France")["token_type_ids"][-1] == 1  # what DPR overrides
    assert types.tolist() == [0] * len(ids)


def test_without_a_title_both_formats_are_the_text_alone(bert_tokenizer):
    text_alone = _ids(bert_tokenizer, "[CLS] the capital of france [SEP]")
    for passage_format in ("paper", "dpr"):
        untitled = tokenize_passages(bert_tokenizer, [Passage("1", "Paris", "the capital of France")], 64, False, passage_format)
        assert untitled.sequence(0)[0].tolist() == text_alone
    empty_title = tokenize_passages(bert_tokenizer, [Passage("1", "", "the capital of France")], 64, True, "dpr")
    assert empty_title.sequence(0)[0].tolist() == text_alone  # DPR drops an empty title


class WidthSpy(torch.nn.Module):
    """An encoder that records the padded width of every batch it is given."""

    embedding_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.widths.append(input_ids.shape[1])
        return torch.zeros(len(input_ids), self.embedding_size)


def test_the_papers_padding_gives_every_encoding_batch_max_length_tokens(demo_assets):
    from dpr_hpc.grid.config import TextConfig

    tokenizer = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    texts = tokenize_questions(tokenizer, ["a short one", "a somewhat longer question than that"] * 5, 64)
    widths = {}
    for text in (TextConfig(max_length=64, padding="max_length"), TextConfig(max_length=64)):
        spy = WidthSpy()
        encode(spy, texts, tokenizer.pad_token_id, 4, torch.device("cpu"), pad_to=text.pad_to)
        widths[text.padding] = set(spy.widths)
    assert widths["max_length"] == {64} and max(widths["longest"]) < 64


def test_the_papers_padding_gives_every_training_batch_max_length_tokens(demo_assets, tmp_path):
    from dpr_hpc.grid import load_grid
    from dpr_hpc.inputs.prepared import load_train
    from dpr_hpc.stages.common import StageIO
    from dpr_hpc.stages.train import _TokenizedExamples

    widths = {}
    for padding in ("longest", "max_length"):
        grid = tmp_path / f"{padding}.yaml"
        grid.write_text(f"name: g\ndata: {{train: {demo_assets}/train.json, dev: {demo_assets}/dev.json}}\n"
                        f"defaults: {{text: {{max_length: 64, padding: {padding}}}}}\n"
                        f"blocks: [{{name: b, encoder: {demo_assets}/models/tiny-bert, embedding_sizes: [32]}}]\n")
        cell = load_grid(grid).cells[0]
        tokenizer = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
        io = StageIO(job=None, out=None, prepared_cache=tmp_path / "prepared")  # no token cache: tokenized here
        batches = _TokenizedExamples(load_train(cell.data_path("train"), tmp_path / "prepared"), tokenizer, tokenizer, cell, io)
        questions, passages = batches.chunks(list(range(8)), 0, torch.device("cpu"), 0)
        widths[padding] = {chunk["input_ids"].shape[1] for chunk in questions + passages}
    assert widths["max_length"] == {64} and max(widths["longest"]) < 64


def test_the_meters_file_writes_are_left_out_of_the_encoding_time(demo_assets):
    """The progress meter writes its file inside the timed loop; the seconds it reports spending
    are taken out of encode_s (a write that takes 0.2 s here, three batches)."""
    import time

    tokenizer = load_tokenizer(str(demo_assets / "models" / "tiny-bert"))
    texts = tokenize_questions(tokenizer, ["a question"] * 12, 64)

    def slow_meter(done: int) -> float:
        time.sleep(0.2)  # stands for a slow file write, not a wait on another process
        return 0.2

    encoded = encode(WidthSpy(), texts, tokenizer.pad_token_id, 4, torch.device("cpu"), meter=slow_meter)
    assert encoded.encode_s < 0.3  # with the writes inside, it would be at least 0.6 s
