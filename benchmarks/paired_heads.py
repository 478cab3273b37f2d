"""Paired tables for the heads study (benchmarks/results/cpu-amd-epyc/heads/: kcm-eval outputs
with heads=True cells).

    PYTHONPATH=. python benchmarks/paired_heads.py DIR [DIR ...]

Reads each DIR's report.json + predictions.npz, or, for a grid stopped early, its
runs.partial.jsonl (finished runs with their test logits; runs.jsonl as committed). Per
budget and method: accuracy mean ± SE over seeds; against the reference at the same budget
(``kcm`` FFN-only when present, else the first method): the per-seed paired accuracy
difference (same unlabeled sample, same test rows) mean ± SE over seeds, and a paired
bootstrap over test sentences.
"""

import json
import sys
from pathlib import Path

import numpy as np

from kcm_cuda.evaluation.analysis import paired_bootstrap
from kcm_cuda.evaluation.datasets import get_task


def load(dirs):
    runs, y, dense = {}, None, None
    for d in map(Path, dirs):
        if (d / "report.json").is_file():
            rep = json.loads((d / "report.json").read_text())
            pr = np.load(d / "predictions.npz")
            y = np.asarray(pr["labels"])
            dense = rep.get("dense", {}).get("accuracy", dense)
            for i, r in enumerate(rep["runs"]):
                if f"run_{i}" in pr.files:
                    lg = pr[f"run_{i}"].astype(np.float64)
                    runs[(r["budget"], r["method"], r["seed"])] = (lg[:, 1] - lg[:, 0], r)
        elif (d / "runs.partial.jsonl").is_file() or (d / "runs.jsonl").is_file():
            if y is None:
                y = np.array([e.label for e in get_task("vader-movie").test])
            partial = d / "runs.partial.jsonl"
            partial = partial if partial.is_file() else d / "runs.jsonl"
            for line in partial.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                r, lg = rec["run"], np.asarray(rec["logits"], dtype=np.float64)
                runs[(r["budget"], r["method"], r["seed"])] = (lg[:, 1] - lg[:, 0], r)
    return runs, y, dense


def main(dirs):
    runs, y, dense = load(dirs)

    def acc(key):
        return float(((runs[key][0] > 0) == (y == 1)).mean())

    print(f"dense accuracy: {dense}")
    print(
        "| c | method | acc % (mean ± SE, seeds) | FLOPs ratio | heads kept (per layer) | "
        "neurons kept | Δ vs ref, per-seed paired (pt) | Δ bootstrap (pt) | prune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in sorted({k[0] for k in runs}, reverse=True):
        ms = sorted({k[1] for k in runs if k[0] == c}, key=lambda m: (m != "kcm", m))
        ref = ms[0]
        for m in ms:
            seeds = sorted(k[2] for k in runs if k[0] == c and k[1] == m)
            a = np.array([acc((c, m, s)) for s in seeds])
            se = a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
            r0 = runs[(c, m, seeds[0])][1]
            diff = boot = ""
            both = [s for s in seeds if (c, ref, s) in runs]
            if m != ref and both:
                d = np.array([acc((c, m, s)) - acc((c, ref, s)) for s in both])
                dse = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                diff = f"{100 * d.mean():+.2f} ± {100 * dse:.2f} (n={len(d)}, vs `{ref}`)"
                b = paired_bootstrap(
                    y, [runs[(c, m, s)][0] for s in both], [runs[(c, ref, s)][0] for s in both]
                )
                boot = f"{100 * b['accuracy_diff']:+.2f} ± {100 * b['accuracy_stderr']:.2f}"
            hk = r0.get("heads_kept_per_layer")
            heads = f"{sum(hk)} {hk}" if hk else "72 (all)"
            ps = np.mean([runs[(c, m, s)][1].get("prune_seconds", np.nan) for s in seeds])
            print(
                f"| {c:g} | `{m}` | {100 * a.mean():.2f} ± {100 * se:.2f} (n={len(a)}) | "
                f"{r0.get('flops_ratio', np.nan):.4f} | {heads} | {sum(r0['kept_per_layer'])} | "
                f"{diff} | {boot} | {ps:.0f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
