"""Paired tables of kcm-eval grids against a reference cell: per task and budget, every cell's
accuracy (mean over seeds), its drop vs dense, and its paired difference (± paired-bootstrap
SE over the test rows, on the seeds both cells have) against the reference, from kcm-eval's
report.json + predictions.npz. Several output directories of the same task (same test rows)
are merged.

    python benchmarks/paired_vs_reference.py OUTDIR [OUTDIR ...] [--ref METHOD_LABEL] [--boot 500]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kcm_cuda.evaluation.analysis import paired_bootstrap


def load(dirs: list[Path]) -> dict:
    tasks: dict[str, dict] = {}
    for outdir in dirs:
        report = json.loads((outdir / "report.json").read_text())
        preds = np.load(outdir / "predictions.npz")
        y = np.asarray(preds["labels"])
        t = tasks.setdefault(
            report["task"]["name"],
            {"y": y, "dense": report["dense"]["accuracy"], "cells": {}, "prune_s": {}},
        )
        if not np.array_equal(t["y"], y):
            raise ValueError(f"{outdir}: other test rows than the first report of the task")
        for i, r in enumerate(report["runs"]):
            key = f"run_{i}"
            if key not in preds.files:
                continue
            lg = preds[key].astype(np.float64)
            cell = t["cells"].setdefault((r["budget"], r["method"]), {})
            cell[r["seed"]] = lg[:, 1] - lg[:, 0]
            t["prune_s"].setdefault((r["budget"], r["method"]), []).append(r["prune_seconds"])
    return tasks


def _acc(y, margins) -> float:
    return float(np.mean([np.mean((m > 0) == y) for m in margins]))


def table(name: str, t: dict, ref: str, n_boot: int) -> str:
    y, dense, cells = t["y"], t["dense"], t["cells"]
    lines = [
        f"### {name} — {len(y)} test rows, dense accuracy {100 * dense:.1f}%",
        "",
        f"| c | method | seeds | acc % | vs dense (pt) | vs `{ref}` (pt, paired ± SE) | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted({k[0] for k in cells}, reverse=True):
        base = cells.get((c, ref))
        rows = [(m, v) for (cc, m), v in cells.items() if cc == c]
        rows.sort(key=lambda mv: -_acc(y, list(mv[1].values())))
        for m, by_seed in rows:
            acc = _acc(y, list(by_seed.values()))
            vs = "—"
            if base is not None and m != ref:
                common = sorted(set(by_seed) & set(base))
                if common:
                    d = paired_bootstrap(
                        y, [by_seed[s] for s in common], [base[s] for s in common], n_boot=n_boot
                    )
                    vs = f"{100 * d['accuracy_diff']:+.1f} ± {100 * d['accuracy_stderr']:.1f}"
            ps = float(np.mean(t["prune_s"][(c, m)]))
            lines.append(
                f"| {c:g} | `{m}` | {len(by_seed)} | {100 * acc:.1f} | "
                f"{100 * (acc - dense):+.1f} | {vs} | {ps:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("outdir", nargs="+")
    p.add_argument("--ref", default="flap:reconstruct=bias")
    p.add_argument("--boot", type=int, default=500)
    a = p.parse_args()
    for name, t in load([Path(d) for d in a.outdir]).items():
        print(table(name, t, a.ref, a.boot))
        print()


if __name__ == "__main__":
    main()
