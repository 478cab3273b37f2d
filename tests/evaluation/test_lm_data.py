"""Text splits and the local BPE tokenizer of the LM evaluation (no download)."""

from __future__ import annotations

import pytest
from lm_fixtures import make_lines, write_text

from kcm_cuda.evaluation.lm_data import (
    encode_stream,
    lines_from_file,
    load_lm_text,
    split_lines,
    train_tokenizer,
)


def test_split_is_deterministic_disjoint_and_deduplicated():
    lines = make_lines(600)
    a = split_lines("t", lines + ["  ", lines[0], lines[1].upper()])
    b = split_lines("t", list(reversed(lines)))
    assert sorted(a.train) == sorted(b.train)
    assert sorted(a.test) == sorted(b.test)
    assert a.notes["duplicates_dropped"] == 2  # lines[0] again, and lines[1] in capitals
    sets = [set(a.train), set(a.calibration), set(a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(a.sizes().values()) == len(set(lines))
    n = len(set(lines))
    assert 0.75 * n < len(a.train) < 0.93 * n
    assert a.fingerprint() == split_lines("t", lines).fingerprint()


def test_split_needs_calibration_and_test_lines():
    with pytest.raises(ValueError, match="empty"):
        split_lines("t", ["one line only"])


def test_file_text(tmp_path):
    p = write_text(tmp_path / "t.txt", 300)
    assert lines_from_file(p) == make_lines(300)
    t = load_lm_text(str(p))
    assert t.source.startswith("local file") and t.test
    with pytest.raises(FileNotFoundError):
        load_lm_text(str(tmp_path / "missing.txt"))


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    lines = make_lines(300)
    tok = train_tokenizer(lines, vocab_size=300)
    tok2 = train_tokenizer(lines, vocab_size=300)
    assert tok.get_vocab() == tok2.get_vocab()
    assert len(tok) <= 300
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok(lines[5], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == lines[5]
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert back(lines[5], add_special_tokens=False)["input_ids"] == ids
    assert back.eos_token_id == tok.eos_token_id


def test_encode_stream_separates_lines_with_eos():
    lines = make_lines(50)
    tok = train_tokenizer(lines, vocab_size=300)
    s = encode_stream(tok, lines[:3])
    assert s[0] == tok.bos_token_id
    assert int((s == tok.eos_token_id).sum()) == 3
    assert s[-1] == tok.eos_token_id
    assert tok.decode(s, skip_special_tokens=True) == "".join(lines[:3])
