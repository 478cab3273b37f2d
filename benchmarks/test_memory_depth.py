"""Smoke test of benchmarks/memory_depth.py (tiny config, two depths, fresh processes)."""

from __future__ import annotations

import json

from benchmarks import memory_depth


def test_memory_depth_smoke(tmp_path):
    assert (
        memory_depth.main(
            ["--tiny", "--depths", "1,2", "--device", "cpu", "--out", str(tmp_path)]
            + ["--structures", "search,fixed"]
        )
        == 0
    )
    result = json.loads((tmp_path / "memory_vs_depth.json").read_text())
    rows = result["rows"]
    assert [(r["depth"], r["structure"]) for r in rows] == [
        (1, "search"), (1, "fixed"), (2, "search"), (2, "fixed")
    ]
    assert [r["searched"] for r in rows] == [True, False, True, False]
    extra = result["extra_of_search"]
    assert set(extra["per_depth_mb"]) == {"1", "2"} and "growth_mb" in extra
    for r in rows:
        assert 0 < r["pruned_mb"] < r["model_mb"]
        assert r["rss_peak_above_start_mb"] > 0
        assert r["flops_ratio"] <= 0.6 + 1e-9
    assert rows[2]["model_mb"] > rows[0]["model_mb"]
    assert "| layers |" in (tmp_path / "memory_vs_depth.md").read_text()
