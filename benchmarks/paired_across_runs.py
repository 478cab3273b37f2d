"""Paired accuracy difference between a method of one kcm-eval output and a method of a second
output made on the same fine-tune, test rows and seeds (both with --save-predictions):

    python benchmarks/paired_across_runs.py NEW_DIR OLD_DIR METHOD_IN_NEW METHOD_IN_OLD

Checks that both hold the same labels and dense logits (the same fine-tuned model), then per
budget prints the mean accuracy of each (over the seeds both have) and the paired difference
other − method, rows as units, ± its standard error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _load(d: Path):
    with open(d / "report.json") as f:
        report = json.load(f)
    return report, np.load(d / "predictions.npz")


def _correct(report, preds, labels, method: str, budget: float) -> dict[int, np.ndarray]:
    out = {}
    for i, run in enumerate(report["runs"]):
        key = f"run_{i}"
        if run["method"] == method and abs(run["budget"] - budget) < 1e-9 and key in preds:
            out[run["seed"]] = preds[key].astype(float).argmax(1) == labels
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("new_dir", type=Path)
    p.add_argument("old_dir", type=Path)
    p.add_argument("method")
    p.add_argument("other")
    a = p.parse_args(argv)
    rn, zn = _load(a.new_dir)
    ro, zo = _load(a.old_dir)
    y = zn["labels"]
    if not np.array_equal(y, zo["labels"]):
        raise SystemExit("the two outputs have different test labels")
    same = np.allclose(zn["dense"].astype(float), zo["dense"].astype(float), atol=1e-2)
    print(f"dense logits equal (the same fine-tuned model): {same}")
    if not same:
        raise SystemExit("the two outputs were made on different fine-tuned models")
    print(f"| c | {a.method} | {a.other} | Δ {a.other} − {a.method} |")
    print("|---|---|---|---|")
    budgets = sorted({r["budget"] for r in rn["runs"]}, reverse=True)
    for c in budgets:
        x = _correct(rn, zn, y, a.method, c)
        o = _correct(ro, zo, y, a.other, c)
        seeds = sorted(set(x) & set(o))
        if not seeds:
            continue
        xa = np.mean([x[s] for s in seeds], axis=0)
        oa = np.mean([o[s] for s in seeds], axis=0)
        d = oa - xa
        se = d.std(ddof=1) / np.sqrt(d.size)
        print(
            f"| {c:g} | {xa.mean() * 100:.1f} | {oa.mean() * 100:.1f} | "
            f"{d.mean() * 100:+.1f} ± {se * 100:.1f} ({len(seeds)} seeds) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
