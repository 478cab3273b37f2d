"""Paired comparisons from a saved evaluation (``kcm-eval --save-predictions``).

    python -m kcm_cuda.evaluation.analysis OUTPUT_DIR [--ref d2] [--boot 1000]

For every (budget, method, Scale) cell and a reference method at the same budget (Scale off),
prints the difference in mean accuracy and in mean ROC-AUC over seeds, each with a standard
error from a paired bootstrap over the test sentences (the same resampled sentences for both
sides, so the test-set noise they share cancels).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kcm_cuda.evaluation.metrics import roc_auc

__all__ = ["main", "paired_bootstrap"]


def _auc_fast(y: np.ndarray, s: np.ndarray) -> float:
    try:
        return roc_auc(y, s)
    except ValueError:
        return float("nan")


def paired_bootstrap(
    labels: np.ndarray,
    margins_a: Sequence[np.ndarray],
    margins_b: Sequence[np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean-over-seeds accuracy and AUC of A minus those of B, with paired-bootstrap standard
    errors. ``margins_*``: per seed, the (N,) score of the positive class (logit difference)."""
    y = np.asarray(labels, dtype=np.int64)
    a = np.stack([np.asarray(m, dtype=np.float64) for m in margins_a])
    b = np.stack([np.asarray(m, dtype=np.float64) for m in margins_b])
    if a.shape[1] != y.size or b.shape[1] != y.size:
        raise ValueError("margins and labels must have the same number of test sentences")

    def stats(idx: np.ndarray) -> tuple[float, float]:
        yy = y[idx]
        acc = np.mean((a[:, idx] > 0) == yy) - np.mean((b[:, idx] > 0) == yy)
        auc = np.mean([_auc_fast(yy, m[idx]) for m in a]) - np.mean(
            [_auc_fast(yy, m[idx]) for m in b]
        )
        return float(acc), float(auc)

    full = stats(np.arange(y.size))
    rng = np.random.default_rng(seed)
    boots = np.array([stats(rng.integers(0, y.size, y.size)) for _ in range(n_boot)])
    return {
        "accuracy_diff": full[0],
        "accuracy_stderr": float(boots[:, 0].std(ddof=1)),
        "auc_diff": full[1],
        "auc_stderr": float(boots[:, 1].std(ddof=1)),
    }


def compare(
    outdir: str | Path, ref: str = "d2", n_boot: int = 1000, cache_dir: str | None = None
) -> list[dict]:
    out = Path(outdir)
    report = json.loads((out / "report.json").read_text())
    preds = np.load(out / "predictions.npz")
    if "labels" in preds.files:
        y = np.asarray(preds["labels"])
    else:  # older files: rebuild the (deterministic) test split
        from kcm_cuda.evaluation.datasets import get_task

        y = np.array([e.label for e in get_task(report["task"]["name"], cache_dir).test])
    cells: dict[tuple, list[np.ndarray]] = {}
    for i, r in enumerate(report["runs"]):
        key = f"run_{i}"
        if key not in preds.files:
            continue
        lg = preds[key].astype(np.float64)
        cells.setdefault((r["budget"], r["method"], r["scale"]), []).append(lg[:, 1] - lg[:, 0])
    rows = []
    for (c, m, s), margins in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        base = cells.get((c, ref, False))
        if base is None or (m == ref and not s):
            continue
        res = paired_bootstrap(y, margins, base, n_boot=n_boot)
        rows.append({"budget": c, "method": m, "scale": s, "reference": ref, **res})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kcm_cuda.evaluation.analysis")
    p.add_argument("outdir")
    p.add_argument("--ref", default="d2")
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    try:
        rows = compare(args.outdir, args.ref, args.boot, args.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"| c | method | Scale | Δacc vs {args.ref} (pt) | ΔAUC vs {args.ref} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['budget']:g} | `{r['method']}` | {'on' if r['scale'] else 'off'} | "
            f"{100 * r['accuracy_diff']:+.1f} ± {100 * r['accuracy_stderr']:.1f} | "
            f"{r['auc_diff']:+.4f} ± {r['auc_stderr']:.4f} |"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
