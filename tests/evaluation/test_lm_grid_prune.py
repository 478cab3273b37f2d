"""The LM grid with the real prune() on a tiny random LLaMA checkpoint (decoder support)."""

from __future__ import annotations

import json

from lm_fixtures import make_lines, tiny_llama, write_text


def test_real_prune_on_a_tiny_llama(tmp_path):
    from kcm_cuda.evaluation.cli import main
    from kcm_cuda.evaluation.lm_data import train_tokenizer

    tok = train_tokenizer(make_lines(300), vocab_size=300)
    model = tiny_llama(vocab=len(tok))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    text = write_text(tmp_path / "t.txt", 300, seed=2)
    out = tmp_path / "out"
    rc = main(["--task", f"lm-{text}", "--model", str(ckpt), "--budgets", "0.7",
               "--samples", "8", "--max-length", "16", "--window", "32",
               "--output", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["errors"]
    runs = report["runs"]
    assert [r["method"] for r in runs] == [
        "default",
        "flap:reconstruct=ridge,structure=fixed",
        "flap:reconstruct=bias",
        "wanda_sp:reconstruct=bias",
    ]
    for r in runs:
        assert abs(r["flops_ratio"] - 0.7) < 0.05
        assert r["parameters"] < report["model"]["parameters"]
        assert r["ppl"] > 1
    assert report["dense_unchanged"] is True  # prune() reads the decoder in place


def test_head_pruning_specs_route_to_prune(tmp_path):
    """A method spec's heads= and experimental gqa_heads= / head_split= reach prune()."""
    from kcm_cuda.evaluation.cli import main
    from kcm_cuda.evaluation.lm_data import train_tokenizer

    tok = train_tokenizer(make_lines(300), vocab_size=300)
    model = tiny_llama(vocab=len(tok))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    text = write_text(tmp_path / "t.txt", 300, seed=2)
    out = tmp_path / "out"
    specs = [
        f"flap:reconstruct=ridge,heads=true,head_split=proportional,gqa_heads={s}"
        for s in ("groups", "per_group")
    ]
    rc = main(["--task", f"lm-{text}", "--model", str(ckpt), "--budgets", "0.6",
               "--samples", "8", "--max-length", "16", "--window", "32",
               "--methods", *specs, "--output", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["errors"]
    groups, per_group = report["runs"]
    # whole groups of 2 query heads; or the 2 KV heads stay and every group keeps g'
    assert [2 * kv for kv in groups["kv_heads_kept_per_layer"]] == groups["heads_kept_per_layer"]
    assert per_group["kv_heads_kept_per_layer"] == [2, 2]
    assert sum(groups["heads_kept_per_layer"]) < 8 and sum(per_group["heads_kept_per_layer"]) < 8
    for r in report["runs"]:
        assert r["flops_ratio"] <= 0.6 + 1e-9 and r["ppl"] > 1
