"""Paired accuracy differences between methods of one or more saved kcm-eval runs.

    python benchmarks/paired_accuracy.py DIR [DIR ...] --pair "A vs B" [--pair "C vs D" ...]

Every DIR holds report.json and predictions.npz (``kcm-eval --save-predictions``) on the
same task and test split (checked: identical labels), or, for a grid still running or
stopped, its runs.partial.jsonl (kcm-eval's checkpoint: the finished runs, with their
logits; committed results name it runs.jsonl). Without a finished DIR, --task NAME[@ROWS]
gives the labels. A method is named by its kcm-eval label plus "/on" when Scale was on (e.g.
``kcm:sigma=median``, ``kcm/on``). For each budget both methods have,
d_i = (mean over seeds of A correct on test row i) − (same for B), and the difference is
mean(d) ± sd(d)/sqrt(N) (the runner's paired standard error), over the seeds both have.
Runs of the same (budget, method, seed) found in several DIRs must have the same mask digest
(else refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _task_labels(task: str) -> np.ndarray:
    """Test labels of ``NAME`` or ``NAME@ROWS`` (accuracy_grid.py's fixed test subset)."""
    from kcm_cuda.evaluation.datasets import get_task

    name, _, rows = task.partition("@")
    t = get_task(name)
    if rows:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from accuracy_grid import subset_test_rows

        t = subset_test_rows(t, int(rows))
    return np.array([int(e.label) for e in t.test])


def load(dirs: list[str], task: str | None = None):
    labels = None
    runs: dict[tuple, tuple[str, np.ndarray]] = {}
    dense = None
    for d in dirs:
        if not (Path(d) / "report.json").is_file():
            continue  # a grid still running: read after the finished ones (labels needed)
        rep = json.loads((Path(d) / "report.json").read_text())
        preds = np.load(Path(d) / "predictions.npz")
        y = np.asarray(preds["labels"])
        if labels is None:
            labels, dense = y, rep["dense"].get("accuracy")
        elif not np.array_equal(labels, y):
            raise ValueError(f"{d}: another test split (labels differ)")
        for i, r in enumerate(rep["runs"]):
            key = f"run_{i}"
            if key in preds.files:
                _add(runs, r, preds[key], y)
    if labels is None and task is not None:
        labels = _task_labels(task)
    if labels is None:
        raise ValueError(
            "no finished report.json among the directories: pass --task NAME[@ROWS] for the labels"
        )
    for d in dirs:
        partial = _checkpoint(Path(d))
        if (Path(d) / "report.json").is_file() or partial is None:
            continue
        for line in partial.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if rec.get("logits") is not None:
                logits = np.asarray(rec["logits"])
                if logits.shape[0] != labels.size:
                    raise ValueError(f"{partial}: another test split")
                _add(runs, rec["run"], logits, labels)
    return labels, runs, dense


def _checkpoint(d: Path) -> Path | None:
    """A grid's finished runs: kcm-eval's runs.partial.jsonl, or runs.jsonl as committed."""
    for name in ("runs.partial.jsonl", "runs.jsonl"):
        if (d / name).is_file():
            return d / name
    return None


def _add(runs: dict, r: dict, logits, y) -> None:
    name = r["method"] + ("/on" if r["scale"] else "")
    k = (r["budget"], name, r["seed"])
    correct = np.asarray(logits, dtype=np.float64).argmax(axis=1) == y
    if k in runs and runs[k][0] != r["mask_digest"]:
        raise ValueError(f"{k}: different masks in two reports")
    runs[k] = (r["mask_digest"], correct)


def paired(runs, a: str, b: str):
    out = []
    budgets = sorted({k[0] for k in runs}, reverse=True)
    for c in budgets:
        # the seeds both have (a grid cut short may have more of one than of the other)
        seeds = {k[2] for k in runs if k[0] == c and k[1] == a}
        seeds &= {k[2] for k in runs if k[0] == c and k[1] == b}
        ra = [runs[(c, a, s)][1] for s in sorted(seeds)]
        rb = [runs[(c, b, s)][1] for s in sorted(seeds)]
        if not ra or not rb:
            continue
        d = np.mean(ra, axis=0) - np.mean(rb, axis=0)
        out.append(
            {
                "budget": c,
                "a": a,
                "b": b,
                "acc_a": float(np.mean(ra)),
                "acc_b": float(np.mean(rb)),
                "n_seeds": (len(ra), len(rb)),
                "diff": float(d.mean()),
                "stderr": float(d.std(ddof=1) / np.sqrt(d.size)),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dirs", nargs="+")
    p.add_argument("--pair", action="append", required=True, metavar="'A vs B'")
    p.add_argument("--task", default=None, help="NAME[@ROWS]: labels when no report is finished")
    args = p.parse_args(argv)
    try:
        labels, runs, dense = load(args.dirs, args.task)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dense_txt = "?" if dense is None else f"{100 * dense:.1f}"
    print(f"test rows {labels.size}; dense accuracy {dense_txt}")
    print("| c | A | B | acc A | acc B | seeds | Δacc A − B (paired, pt) |")
    print("|---|---|---|---|---|---|---|")
    for pair in args.pair:
        a, sep, b = pair.partition(" vs ")
        if not sep:
            print(f"error: --pair {pair!r} is not 'A vs B'", file=sys.stderr)
            return 2
        for r in paired(runs, a, b):
            print(
                f"| {r['budget']:g} | `{a}` | `{b}` | {100 * r['acc_a']:.1f} | "
                f"{100 * r['acc_b']:.1f} | {r['n_seeds'][0]}/{r['n_seeds'][1]} | "
                f"{100 * r['diff']:+.1f} ± {100 * r['stderr']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
