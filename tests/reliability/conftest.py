"""Fixtures of the fault-injection suite: a tiny BERT saved with its tokenizer, an
unlabeled text file, a pruned model saved from it, and a hash of every input taken before and
after each test (an input that changed fails the test, whatever else it checked).

The model builders are the pruning tests' own (tests/pruning/conftest.py), loaded under another
module name so that the two conftest files do not shadow each other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_helpers import pc, tree_hash

_one_thread = pc._one_thread  # noqa: F401 - the autouse fixture: one torch thread
tokenizer_dir = pc.tokenizer_dir  # noqa: F401 - a local WordPiece tokenizer (session)
tokenizer = pc.tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny BERT classifier and its tokenizer, saved once; read-only for every test (the
    autouse ``inputs_unchanged`` fixture checks it)."""
    d = tmp_path_factory.mktemp("input") / "model"
    pc.tiny_bert("seqcls", vocab_size=tokenizer.vocab_size).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "unlabeled.txt"
    f.write_text("\n".join(pc.make_sentences(200, seed=1)) + "\n", encoding="utf-8")
    return f


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory, model_dir, data_file, tokenizer):
    """A model pruned from ``model_dir`` and saved (what the save fault tests write again)."""
    import transformers

    from kcm_cuda.pruning import prune

    model = transformers.BertForSequenceClassification.from_pretrained(model_dir)
    res = prune(
        model,
        data_file.read_text().splitlines(),
        0.8,
        tokenizer=tokenizer,
        samples=64,
        max_length=32,
        progress=False,
    )
    return res.save(tmp_path_factory.mktemp("pruned") / "pruned")


@pytest.fixture(autouse=True)
def inputs_unchanged(request):
    """Hash the session's input model, data file and pruned model before the test, and check
    them after it."""
    names = [n for n in ("model_dir", "data_file", "pruned_dir") if n in request.fixturenames]
    paths = [request.getfixturevalue(n) for n in names]
    before = [tree_hash(p) for p in paths]
    yield
    after = [tree_hash(p) for p in paths]
    for name, b, a in zip(names, before, after, strict=True):
        assert a == b, f"the input {name} was modified by the test"


@pytest.fixture
def copy_model(tmp_path, model_dir):
    """A writable copy of the input model (to corrupt)."""

    def make(name: str = "model") -> Path:
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        return d

    return make
