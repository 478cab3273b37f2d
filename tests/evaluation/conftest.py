"""Fixtures of the evaluation tests: a tiny random BERT with its own WordPiece vocabulary and a
few dozen labelled sentences, all built here (no download, seconds on a CPU)."""

from __future__ import annotations

import itertools
import random

import pytest

POSITIVE = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "superb"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "messy", "weak"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending"]
ADVERBS = ["really", "quite", "truly", "so", "very"]


def make_sentences(n: int = 90, seed: int = 0) -> list[tuple[str, str, int]]:
    """(id, text, label) with label 1 for a positive adjective."""
    rng = random.Random(seed)
    combos = list(itertools.product(SUBJECTS, ADVERBS, POSITIVE + NEGATIVE))
    rng.shuffle(combos)
    out = []
    for i, (s, a, adj) in enumerate(combos[:n]):
        out.append((str(i + 1), f"{s} was {a} {adj} .", int(adj in POSITIVE)))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for _, t, _ in make_sentences(500) for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def sentences():
    """The sentence generator itself: sentences(n) -> [(id, text, label)]."""
    return make_sentences


@pytest.fixture()
def tiny_tsv(tmp_path):
    p = tmp_path / "tiny.tsv"
    rows = ["id\tsentence\tlabel"] + [f"{i}\t{t}\t{y}" for i, t, y in make_sentences(150)]
    p.write_text("\n".join(rows) + "\n")
    return p
