"""benchmarks/calibration_size.py: the size option reaches prune(), and the analysis pairs each
size with the largest on the same test rows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import calibration_size


def test_sized_prune_passes_the_size_as_samples(monkeypatch):
    import kcm_cuda.pruning as pruning

    seen = {}
    monkeypatch.setattr(pruning, "prune", lambda m, d, c, **kw: seen.update(kw) or "result")
    assert calibration_size.sized_prune("model", ["x"], 0.6, calib=128, samples=2048) == "result"
    assert seen == {"samples": 128}


def test_analyse_pairs_against_the_largest_size(tmp_path):
    labels = np.array([0, 1, 0, 1])
    right = np.eye(2)[labels]  # logits that predict every label
    wrong_first = right.copy()
    wrong_first[0] = right[0][::-1]
    runs, arrays = [], {"labels": labels}
    for i, (n, seed, logits) in enumerate(
        [(64, 0, wrong_first), (64, 1, right), (256, 0, right), (256, 1, right)]
    ):
        runs.append(
            {
                "budget": 0.6,
                "options": {"calib": n},
                "seed": seed,
                "prune_seconds": float(n),
                "prune_timings_s": {"ridge": 1.0},
            }
        )
        arrays[f"run_{i}"] = logits.astype(np.float16)
    np.savez(tmp_path / "p.npz", **arrays)
    out = calibration_size.analyse({"runs": runs}, str(tmp_path / "p.npz"))
    small, large = out["rows"]
    assert out["largest"] == 256 and small["samples"] == 64 and small["seeds"] == 2
    assert small["accuracy"] == pytest.approx(0.875) and large["accuracy"] == 1.0
    assert small["vs_largest"] == pytest.approx(-0.125)
    assert small["vs_largest_se"] == pytest.approx(np.std([-0.5, 0, 0, 0], ddof=1) / 2)
    assert large["vs_largest"] == 0.0 and small["prune_seconds"] == 64.0
