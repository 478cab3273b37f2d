"""Smoke tests of the deployment benchmarks (tiny random models): they run end to end and
write a report whose rows compare every pruned model with its dense baseline of the same run."""

from __future__ import annotations

import json

import pytest


def test_onnx_speed_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from benchmarks.onnx_speed import main

    args = [
        "--models",
        "tiny",
        "--budgets",
        "0.8",
        "--batches",
        "1,2",
        "--rounds",
        "1",
        "--seq",
        "16",
        "--samples",
        "64",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["graph"], r["batch"]) for r in rows} == {
        (g, b) for g in ("dense", "c=0.8") for b in (1, 2)
    }
    dense = [r for r in rows if r["graph"] == "dense"]
    assert all(r["speedup"] == 1.0 for r in dense)
    pruned = [r for r in rows if r["graph"] != "dense"]
    assert all(r["parameters"] < dense[0]["parameters"] for r in pruned)
    assert "| tiny |" in (tmp_path / "report.md").read_text()


def test_decoder_speed_smoke(tmp_path):
    from benchmarks.decoder_speed import main

    args = [
        "--models",
        "tiny",
        "--budgets",
        "0.7",
        "--rounds",
        "1",
        "--prompt",
        "16",
        "--new",
        "4",
        "--samples",
        "64",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "c=0.7 standard", "c=0.7 per_layer"]
    std = rows[1]
    assert isinstance(std["ffn"], int) and std["parameters"] < rows[0]["parameters"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
