"""Non-finite weights: in the input, a one-line error naming the tensor before the long steps;
produced by a refit, a fallback to plain pruning that the report shows; never saved."""

from __future__ import annotations

import json

import pytest
import torch
from reliability_helpers import PRUNE_ARGS, one_line_error, pc, tree_hash

from kcm_cuda.cli import main
from kcm_cuda.pruning import load_pruned, prune
from kcm_cuda.pruning.saving import save_pruned

W1 = "bert.encoder.layer.1.intermediate.dense.weight"


def _poison(d, name: str, value: float, index=(0, 0)) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    state = load_file(str(f))
    state[name][index] = value
    save_file(state, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name,value,what",
    [
        (W1, float("nan"), "1 NaN"),
        ("bert.encoder.layer.0.output.dense.bias", float("inf"), "1 inf"),
        ("bert.encoder.layer.2.attention.self.query.weight", float("-inf"), "1 inf"),
        ("bert.embeddings.word_embeddings.weight", float("nan"), "1 NaN"),
    ],
    ids=["w1-nan", "b2-inf", "query-neginf", "embedding-nan"],
)
def test_cli_non_finite_input_weight_is_one_line(
    tmp_path, capsys, copy_model, data_file, name, value, what
):
    model = copy_model()
    index = (0,) if name.endswith("bias") else (0, 0)
    _poison(model, name, value, index)
    before = tree_hash(model)
    out = tmp_path / "out"
    rc = main([str(model), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS])
    assert rc == 2
    err = one_line_error(capsys.readouterr().err)
    assert name in err and what in err and "nothing was pruned" in err
    assert not out.exists() and tree_hash(model) == before


def test_kcm_eval_non_finite_weight_is_one_line(tmp_path, capsys, copy_model):
    from kcm_cuda.evaluation.cli import main as eval_main

    model = copy_model()
    _poison(model, W1, float("nan"))
    before = tree_hash(model)
    tsv = tmp_path / "t.tsv"
    tsv.write_text(
        "id\tsentence\tlabel\n" + "".join(f"{i}\tfilm {i}\t{i % 2}\n" for i in range(40))
    )
    argv = ["--model", str(model), "--data", str(tsv), "--output", str(tmp_path / "rep")]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert eval_main(argv) == 2
    err = one_line_error(capsys.readouterr().err, "kcm-eval")
    assert W1 in err and "1 NaN" in err and "nothing was fine-tuned" in err
    assert tree_hash(model) == before


def test_api_checks_weights_before_the_long_steps(monkeypatch, tokenizer, data_file):
    from kcm_cuda.pruning import api

    model = pc.tiny_bert(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[3, 5] = float("nan")
    called = []
    monkeypatch.setattr(api, "build_context", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"layer\.0\.output\.dense\.weight .*index \[3, 5\]"):
        prune(model, data_file.read_text().splitlines(), 0.8, tokenizer=tokenizer)
    assert not called  # no sample drawn, no teacher copied


def _prune(tokenizer, data_file, flops=0.8, **kw):
    model = pc.tiny_bert(vocab_size=tokenizer.vocab_size)
    texts = data_file.read_text().splitlines()
    return prune(
        model, texts, flops, tokenizer=tokenizer, samples=64, max_length=32, progress=False, **kw
    )


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("variant", ["ridge", "scale"])
def test_refit_that_produces_nan_falls_back(tmp_path, monkeypatch, tokenizer, data_file, variant):
    from kcm_cuda.pruning import reconstruct as R

    if variant == "ridge":
        real = R.LinearRefit.ridge

        def broken(self, W0, lam):  # a solve that "succeeds" with NaN in it
            W, db, fb = real(self, W0, lam)
            return torch.full_like(W, float("nan")), db, False

        monkeypatch.setattr(R.LinearRefit, "ridge", broken)
    else:

        def broken(M, r, lam, retries):
            return torch.full_like(r, float("nan")), False, lam

        monkeypatch.setattr(R, "solve_with_retries", broken)
    res = _prune(tokenizer, data_file, reconstruct=variant)
    rows = res.report["layers"]
    key = "reconstruct_fallback" if "reconstruct_fallback" in rows[0] else "scale_fallback"
    assert all(r[key] for r in rows), rows
    assert "plain pruning kept" in " ".join(res.report.get("reconstruct_notes", []))
    assert _all_finite(res.model)
    out = res.save(tmp_path / "out")
    assert _all_finite(load_pruned(out))
    text = (out / "kcm_report.json").read_text()
    assert "NaN" not in text and "nan" not in json.dumps(rows)


def test_attention_refit_that_produces_nan_falls_back(monkeypatch, tokenizer, data_file):
    from kcm_cuda.pruning import reconstruct

    real = torch.cholesky_solve
    monkeypatch.setattr(
        reconstruct.torch, "cholesky_solve", lambda B, L: torch.full_like(real(B, L), float("nan"))
    )
    res = _prune(tokenizer, data_file, flops=0.4, heads=True, reconstruct="ridge")
    monkeypatch.setattr(reconstruct.torch, "cholesky_solve", real)
    assert res.head_masks is not None
    rows = res.report["layers"]
    assert any(row["heads_kept"] < row["heads"] for row in rows)
    assert not any(row.get("o_refit") for row in rows)  # O kept as it was
    assert all(row["reconstruct_fallback"] for row in rows)
    assert _all_finite(res.model)


def test_save_refuses_non_finite_weights(tmp_path, tokenizer):
    model = pc.tiny_bert(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.classifier.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"classifier\.weight .*nothing was saved"):
        save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
