"""The LM perplexity grid and `kcm-eval --task lm-*`, with a stand-in for prune() (the
real one on a tiny LLaMA is in test_lm_grid_prune.py once prune() takes decoders)."""

from __future__ import annotations

import json

import pytest
from lm_fixtures import fake_prune, make_lines, tiny_llama, tiny_settings, write_text

from kcm_cuda.evaluation.lm_grid import (
    DEFAULT_LM_METHODS,
    LMGridConfig,
    format_lm_markdown,
    parse_method,
    run_lm_grid,
    write_lm_report,
)


def test_parse_method():
    assert parse_method("flap:reconstruct=ridge,heads=true") == (
        "flap",
        {"reconstruct": "ridge", "heads": True},
    )
    assert parse_method("random") == ("random", {})
    with pytest.raises(ValueError):
        parse_method("flap:reconstruct")


def test_grid_with_the_small_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path / "cache"))
    text = write_text(tmp_path / "t.txt", 400)
    calls = []

    def prune(model, data, **kw):
        calls.append(kw)
        return fake_prune(model, data, **kw)

    cfg = LMGridConfig(
        task=f"lm-{text}",
        budgets=(0.8, 0.6),
        seeds=2,
        samples=4,
        seq_len=16,
        batch_size=8,
        output=str(tmp_path / "out"),
        lm_settings=tiny_settings(),
    )
    partial = []
    report = run_lm_grid(
        cfg,
        prune_fn=prune,
        log=lambda m: None,
        checkpoint=lambda r: partial.append((r["seeds_done"], len(r["runs"]))),
    )
    n_methods = len(DEFAULT_LM_METHODS)  # the default (search), its fixed rules, two peers
    assert partial == [(1, 2 * n_methods)]  # after the first seed round, not after the last
    assert report["seeds_done"] == 2 and report["dense_unchanged"] is True
    assert len(report["runs"]) == 2 * n_methods * 2 and not report["errors"]
    # the default row calls prune() as a user does: no method=, no reconstruct=
    assert {c["method"] for c in calls} == {None, "flap", "wanda_sp"}
    assert {c.get("reconstruct") for c in calls} == {None, "ridge", "bias"}
    assert {c.get("structure") for c in calls} == {None, "fixed"}
    assert all(c["samples"] == 4 and c["progress"] is False for c in calls)
    assert report["config"]["window"] == 32 and report["config"]["stride"] == 16
    assert report["lm"]["kind"] == "small LM trained here"
    assert report["lm"]["unigram_test_ppl"] > 1
    dense = report["dense"]["ppl"]
    for r in report["runs"]:
        assert r["ppl"] > 0 and r["prune_seconds"] >= 0 and r["eval_seconds"] > 0
        assert "vs_dense" in r
        assert ("vs_default" in r) == (r["method"] != DEFAULT_LM_METHODS[0])
    assert dense > 0
    rows = report["summary"]
    assert len(rows) == 2 * n_methods
    assert rows[0]["budget"] == 0.8 and rows[0]["ppl"]["n"] == 2
    assert rows[1]["vs_default"]["seeds"] == 2
    paths = write_lm_report(report, cfg.output)
    md = paths["md"].read_text()
    assert "not for a real LLM" in md and "Wanda-sp" in md and "Δ NLL" in md
    back = json.loads(paths["json"].read_text())
    assert back["runs"][0]["ppl"] == pytest.approx(report["runs"][0]["ppl"])


def _checkpoint(tmp_path):
    from kcm_cuda.evaluation.lm_data import train_tokenizer

    tok = train_tokenizer(make_lines(300), vocab_size=300)
    model = tiny_llama(vocab=len(tok))
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_local_checkpoint_and_text_file(tmp_path, monkeypatch, capsys):
    import kcm_cuda
    from kcm_cuda.evaluation.cli import main

    monkeypatch.setattr(kcm_cuda, "prune", fake_prune, raising=False)
    ckpt = _checkpoint(tmp_path)
    text = write_text(tmp_path / "t.txt", 300, seed=1)
    out = tmp_path / "out"
    rc = main(
        [
            "--task", f"lm-{text}", "--model", str(ckpt), "--budgets", "0.7",
            "--samples", "4", "--max-length", "16", "--window", "24", "--stride", "8",
            "--output", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lm"]["kind"] == "local checkpoint"
    assert report["config"]["window"] == 24 and report["config"]["stride"] == 8
    assert [r["budget"] for r in report["runs"]] == [0.7] * len(DEFAULT_LM_METHODS)
    assert "report.md" in capsys.readouterr().out
    assert "not for a real LLM" not in (out / "report.md").read_text()


def test_cli_exits_1_when_every_prune_fails(tmp_path, monkeypatch, capsys):
    import kcm_cuda
    from kcm_cuda.evaluation.cli import main

    def broken(*a, **kw):
        raise NotImplementedError("LlamaForCausalLM is not supported")

    monkeypatch.setattr(kcm_cuda, "prune", broken, raising=False)
    ckpt = _checkpoint(tmp_path)
    text = write_text(tmp_path / "t.txt", 300, seed=1)
    out = tmp_path / "out"
    rc = main(["--task", f"lm-{text}", "--model", str(ckpt), "--budgets", "0.7",
               "--samples", "4", "--max-length", "16", "--output", str(out)])  # fmt: skip
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    assert len(report["errors"]) == len(DEFAULT_LM_METHODS) and not report["runs"]
    assert "NotImplementedError" in format_lm_markdown(report)
    assert "no pruned model was measured" in capsys.readouterr().err


def test_cli_missing_model_dir(tmp_path):
    from kcm_cuda.evaluation.cli import main

    text = write_text(tmp_path / "t.txt", 300)
    rc = main(["--task", f"lm-{text}", "--model", str(tmp_path / "nope"),
               "--output", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
