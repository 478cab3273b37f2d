"""Unlabeled data: formats, sampling, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.data import prepare_sample, read_texts


def test_list_and_pairs(tokenizer, sentences):
    s = prepare_sample(sentences, tokenizer, samples=50, max_length=16, seed=3)
    assert s.input_ids.shape[0] == 50 and s.input_ids.shape[1] <= 16
    assert s.n_tokens == int(s.attention_mask.sum())
    pairs = list(zip(sentences[:40], sentences[40:80], strict=True))
    p = prepare_sample(pairs, tokenizer, samples=100, max_length=24)
    assert p.n_sequences == 40
    assert p.token_type_ids is not None and int(p.token_type_ids.max()) == 1


def test_batches_group_sequences_of_like_length(tokenizer, sentences):
    """Every sequence once, in decreasing-length batches, each trimmed to its longest; the
    labels follow their sequences."""
    labels = list(range(len(sentences)))
    s = prepare_sample(sentences, tokenizer, samples=70, max_length=32, seed=4, labels=labels)
    rows = s.batch_rows(16)
    assert sorted(torch.cat(rows).tolist()) == list(range(s.n_sequences))
    lengths = s.attention_mask.sum(dim=1)
    firsts = [int(lengths[r].max()) for r in rows]
    assert firsts == sorted(firsts, reverse=True)
    padded = 0
    for r, batch, y in zip(rows, s.batches(16, "cpu"), s.label_batches(16), strict=True):
        assert batch["input_ids"].shape == (len(r), int(lengths[r].max()))
        assert torch.equal(batch["input_ids"], s.input_ids[r, : batch["input_ids"].shape[1]])
        assert torch.equal(y, s.labels[r])
        padded += batch["attention_mask"].numel()
    in_order = sum(
        int(lengths[i : i + 16].max()) * len(lengths[i : i + 16])
        for i in range(0, s.n_sequences, 16)
    )
    assert s.n_tokens <= padded <= in_order


def test_seeded_sampling(tokenizer, sentences):
    a = prepare_sample(sentences, tokenizer, samples=20, seed=1)
    b = prepare_sample(sentences, tokenizer, samples=20, seed=1)
    c = prepare_sample(sentences, tokenizer, samples=20, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids) or a.input_ids.shape != c.input_ids.shape


def test_file_formats(tmp_path, sentences):
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(sentences[:10]) + "\n\n  \n", encoding="utf-8")
    assert read_texts(txt) == sentences[:10]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"sentence": s, "label": 1}) for s in sentences[:5]))
    assert read_texts(jl) == sentences[:5]
    jp = tmp_path / "p.jsonl"
    jp.write_text("\n".join(json.dumps({"question": s, "context": s[::-1]}) for s in sentences[:5]))
    assert read_texts(jp)[0] == (sentences[0], sentences[0][::-1])
    csv = tmp_path / "d.csv"
    csv.write_text('id,body\n1,"hello, world"\n2,second one\n')
    assert read_texts(csv, text_column="body") == ["hello, world", "second one"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("premise\thypothesis\na b\tc d\n")
    assert read_texts(tsv) == [("a b", "c d")]
    with pytest.raises(ValueError, match="text_column"):
        read_texts(csv)
    one = tmp_path / "one.csv"
    one.write_text("whatever\nfirst\nsecond\n")
    assert read_texts(one) == ["first", "second"]
    with pytest.raises(ValueError, match="'nope' not found"):
        read_texts(csv, text_column="nope")


def test_pretokenized(tokenizer, sentences):
    enc = tokenizer(sentences[:30], padding=True, return_tensors="pt")
    s = prepare_sample(enc, None, samples=10)  # a BatchEncoding is accepted as is
    assert s.n_sequences == 10
    s2 = prepare_sample({"input_ids": enc["input_ids"].tolist()}, None)
    assert s2.n_tokens == enc["input_ids"].numel()
    with pytest.raises(ValueError, match="input_ids"):
        prepare_sample({"attention_mask": enc["attention_mask"]}, None)
    with pytest.raises(ValueError, match="attention_mask"):
        prepare_sample(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"][:, :3]}, None
        )


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "no text"),
        (b"\n\n   \n", "no text"),
        (b"\xff\xfe\xfa broken \x80\x81", "not UTF-8"),
        (b"abc\x00def", "binary"),
    ],
)
def test_bad_files(tmp_path, bert, tokenizer, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        prune(bert, str(f), 0.7, tokenizer=tokenizer, progress=False)


def test_missing_file_and_bad_types(tmp_path, bert, tokenizer):
    with pytest.raises(ValueError, match="not found"):
        prune(bert, str(tmp_path / "nope.txt"), 0.7, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="empty"):
        prune(bert, [], 0.7, tokenizer=tokenizer, progress=False)
    with pytest.raises(TypeError, match="data"):
        prune(bert, [1, 2, 3], 0.7, tokenizer=tokenizer, progress=False)
    with pytest.raises(TypeError, match="data"):
        prune(bert, 42, 0.7, tokenizer=tokenizer, progress=False)
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        prune(bert, str(bad_json), 0.7, tokenizer=tokenizer, progress=False)


def test_too_few_tokens(bert, tokenizer, sentences):
    with pytest.raises(ValueError, match="real tokens") as info:
        prune(bert, sentences[:3], 0.7, tokenizer=tokenizer, progress=False)
    assert "96" in str(info.value)  # the widest layer's size is named


def test_text_without_tokenizer(bert, sentences):
    bert.config._name_or_path = ""
    with pytest.raises(ValueError, match="tokenizer"):
        prune(bert, sentences, 0.7, progress=False)
