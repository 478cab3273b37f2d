"""Smoke test of benchmarks/memory_depth.py (tiny config, two depths, fresh processes)."""

from __future__ import annotations

import json

from benchmarks import memory_depth


def test_memory_depth_smoke(tmp_path):
    assert (
        memory_depth.main(["--tiny", "--depths", "1,2", "--device", "cpu", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "memory_vs_depth.json").read_text())
    rows = result["rows"]
    assert [r["depth"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["pruned_mb"] < r["model_mb"]
        assert r["rss_peak_above_start_mb"] > 0
        assert r["flops_ratio"] <= 0.6 + 1e-9
    assert rows[1]["model_mb"] > rows[0]["model_mb"]
    assert "| layers |" in (tmp_path / "memory_vs_depth.md").read_text()
