"""load_pruned at the saved size and dtype, without a random initialisation, and our own
outputs read back through it by kcm-prune and kcm-eval (never as if they were dense)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kcm_cuda
from kcm_cuda.cli import main
from kcm_cuda.pruning.saving import load_pruned, needs_load_pruned
from tests.pruning.conftest import (
    WORDS,
    tiny_bert,
    tiny_decoder,
    token_batch,
    word_level_tokenizer,
)


@pytest.mark.parametrize("build", [lambda: tiny_decoder("llama"), tiny_bert])
@pytest.mark.parametrize("padded", [True, False])
def test_a_bfloat16_output_reloads_as_bfloat16(build, padded, tmp_path):
    model = build().to(torch.bfloat16)
    r = kcm_cuda.prune(
        model, token_batch(96, 24), 0.6, samples=64, progress=False, heads=True, structure="fixed"
    )
    out = r.save(tmp_path / "out", padded=padded)
    back = load_pruned(out)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert back.config.dtype == torch.bfloat16
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in r.model.parameters())
    x = token_batch(3, 12, seed=2)
    with torch.no_grad():
        got = back(**x)[0]
        ref = r.model(**x)[0]
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref.float()).abs().max()) < 0.1  # bf16 rounding of RoPE only
    as32 = load_pruned(out, dtype="float32")
    assert {p.dtype for p in as32.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype must be"):
        load_pruned(out, dtype="int8")


def test_load_pruned_builds_no_weights_before_assigning_the_saved_ones(tmp_path, monkeypatch):
    r = kcm_cuda.prune(
        tiny_decoder("llama"),
        token_batch(96, 24),
        0.6,
        samples=64,
        progress=False,
        structure="fixed",
    )
    out = r.save(tmp_path / "out", padded=False)
    devices = []
    reset = nn.Linear.reset_parameters

    def record(self):
        devices.append(self.weight.device.type)
        return reset(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", record)
    back = load_pruned(out)
    assert devices and set(devices) == {"meta"}, devices  # no random init touched memory
    assert all(p.device.type == "cpu" for p in back.parameters())
    x = token_batch(2, 10, seed=1)
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, r.model(**x).logits, atol=1e-6)


def _llama_checkpoint(tmp_path, family="llama"):
    tok = word_level_tokenizer()
    model = tiny_decoder(family, vocab_size=len(tok), heads=8, kv_heads=2)
    d = tmp_path / family
    model.save_pretrained(d)
    tok.save_pretrained(d)
    data = tmp_path / "calib.txt"
    rng = torch.Generator().manual_seed(0)
    lines = [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (14,), generator=rng))
        for _ in range(160)
    ]
    data.write_text("\n".join(lines) + "\n")
    return d, data


def _kcm_prune(src, data, out, flops, *extra):
    argv = [
        str(src),
        "--data",
        str(data),
        "--flops",
        str(flops),
        "--output",
        str(out),
        "--samples",
        "96",
        "--max-length",
        "16",
        "--quiet",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "kcm_report.json").read_text())


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_re_pruning_our_own_output_counts_its_real_flops(family, tmp_path, capsys):
    src, data = _llama_checkpoint(tmp_path, family)
    first = _kcm_prune(src, data, tmp_path / "p1", 0.6, "--heads", "--structure", "fixed")
    pruned = load_pruned(tmp_path / "p1")
    # Mistral's refit bias makes its output one plain from_pretrained cannot read
    assert needs_load_pruned(pruned.config)
    second = _kcm_prune(tmp_path / "p1", data, tmp_path / "p2", 0.8, "--structure", "fixed")
    # the model it was given is the pruned one: its FLOPs, not the padded or dense ones
    assert second["flops"]["before"] == pytest.approx(first["flops"]["after"], rel=1e-6)
    again = load_pruned(tmp_path / "p2")
    n1 = sum(p.numel() for p in pruned.parameters())
    n2 = sum(p.numel() for p in again.parameters())
    assert n2 < n1


def test_kcm_eval_reads_a_pruned_classifier_at_its_size(tmp_path, tokenizer):
    from kcm_cuda.evaluation.modeling import load_classifier

    tok = tokenizer
    model = tiny_bert(vocab_size=tok.vocab_size)
    r = kcm_cuda.prune(
        model,
        token_batch(96, 24, vocab_size=tok.vocab_size),
        0.5,
        samples=64,
        progress=False,
        heads=True,
        structure="fixed",
    )
    r.tokenizer = tok
    out = r.save(tmp_path / "out")
    clf, _ = load_classifier(out, num_labels=2)
    n = sum(p.numel() for p in clf.parameters())
    assert n == sum(p.numel() for p in r.model.parameters())
    with pytest.raises(ValueError, match="labels"):
        load_classifier(out, num_labels=3)
