"""Does the structure search pick well? Every candidate of the default's search gets the full
sequential refit; each one's held-out criterion (the search's, on unlabeled pool rows), its
one-shot proxy criterion and its test accuracy (labelled test rows, never seen by the search)
are written side by side, with the candidate the search chose.

    python -m benchmarks.structure_search --task vader-amazon --budgets 0.7,0.5 --seeds 1 \
        --output benchmarks/results/cpu-amd-epyc/structure_search_vader-amazon

Reads the fine-tuned classifier kcm-eval caches for the task (run kcm-eval once first).
Writes results.json and report.md: per cell, the proxy's rank correlation with the full-refit
criterion (Spearman), the criterion's with test accuracy, and the chosen candidate's test
accuracy next to the best candidate's (paired difference on the same test rows, ± SE).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def _label(st: dict) -> str:
    heads = f"heads/{st['head_split']}" if st.get("heads") else "FFN"
    return f"{st['method']} {st['allocation']} {heads} {st.get('refit', '')}".strip()


def _spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    if len(a) < 3:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    d = x.astype(float) - y.astype(float)
    return float(d.mean() * 100), float(d.std(ddof=1) / math.sqrt(len(d)) * 100)


def _staged_choice(rows: list[dict], stages) -> dict:
    """What the default (staged search, one finalist) picks among ``rows``: the stages over
    the proxy values, then the better refit of the proxy's winner by the criterion."""
    seq = [r for r in rows if r["refit"] == "sequential"]
    at = {"method": "flap", "allocation": "uniform"}
    for parts in stages:
        pool = [
            r
            for r in seq
            if all(r["structure"].get(k) == v for k, v in at.items() if k not in parts)
        ]
        best = min(pool, key=lambda r: r["proxy"])
        at = {
            "method": best["structure"]["method"],
            "allocation": best["structure"]["allocation"],
            "heads": best["structure"]["heads"],
        }
        if best["structure"]["heads"]:
            at["head_split"] = best["structure"]["head_split"]
    both = [r for r in rows if r["structure"] == best["structure"]]
    return min(both, key=lambda r: r["criterion"])


def _fixed_rule(rows: list[dict], c: float) -> dict | None:
    """structure='fixed': flap, uniform widths, heads (per_mac) at c <= 0.7, sequential."""
    want = {"method": "flap", "allocation": "uniform", "heads": c <= 0.7}
    if c <= 0.7:
        want["head_split"] = "per_mac"
    return next((r for r in rows if r["structure"] == want and r["refit"] == "sequential"), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="vader-amazon")
    p.add_argument("--budgets", default="0.7,0.5")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--output", required=True)
    p.add_argument(
        "--finetuned",
        required=True,
        help="the fine-tuned classifier directory (kcm-eval's report.json: finetune.cache_path)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import kcm_cuda
    from kcm_cuda.evaluation.datasets import get_task
    from kcm_cuda.evaluation.modeling import SentenceClassifier, predict, tokenize
    from kcm_cuda.pruning import structure

    task = get_task(args.task)
    tok = AutoTokenizer.from_pretrained(args.finetuned)
    clf = SentenceClassifier(AutoModelForSequenceClassification.from_pretrained(args.finetuned))
    info = args.finetuned
    test = tokenize(tok, [e.text for e in task.test], max_length=128)
    y = np.array([e.label for e in task.test])
    dense = predict(clf, test).argmax(1) == y
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    for c in [float(x) for x in args.budgets.split(",")]:
        for seed in range(args.seeds):
            got: dict = {}

            def hook(st, mode, student, value, got=got):
                logits = predict(SentenceClassifier(student), test)
                key = (json.dumps(st.as_dict(), sort_keys=True), mode)
                got[key] = (value, logits.argmax(1) == y)

            structure.FINALIST_HOOK = hook
            stages = structure.STAGES
            structure.STAGES = (tuple(p for stage in stages for p in stage),)  # every candidate
            t0 = time.perf_counter()
            try:
                r = kcm_cuda.prune(
                    clf.model,
                    task.pool,
                    c,
                    tokenizer=tok,
                    seed=seed,
                    progress=False,
                    experimental={"search_finalists": 99},
                )
            finally:
                structure.FINALIST_HOOK = None
                structure.STAGES = stages
            wall = time.perf_counter() - t0
            block = r.report["structure"]
            rows = []
            for cand in block["candidates"]:
                key = json.dumps(cand["structure"], sort_keys=True)
                if (key, "sequential") not in got:
                    continue  # skipped, or the same masks as another candidate
                for mode in ("oneshot", "sequential"):
                    value, correct = got[(key, mode)]
                    rows.append(
                        {
                            "structure": cand["structure"],
                            "refit": mode,
                            "proxy": cand["criterion"],
                            "criterion": value,
                            "test_accuracy": float(correct.mean() * 100),
                            "_correct": correct,
                        }
                    )
            pick = _staged_choice(rows, stages)
            best = max(rows, key=lambda r: r["test_accuracy"])
            fixed = _fixed_rule(rows, c)
            diff, se = _paired(pick["_correct"], best["_correct"])
            fdiff, fse = _paired(pick["_correct"], fixed["_correct"]) if fixed else (None, None)
            seq = [r for r in rows if r["refit"] == "sequential"]
            cell = {
                "budget": c,
                "seed": seed,
                "prune_s_all_candidates_both_refits": wall,
                "dense_accuracy": float(dense.mean() * 100),
                "spearman_proxy_vs_sequential": _spearman(
                    [r["proxy"] for r in seq], [r["criterion"] for r in seq]
                ),
                "spearman_criterion_vs_test_error": _spearman(
                    [r["criterion"] for r in rows], [-r["test_accuracy"] for r in rows]
                ),
                "chosen": {**pick["structure"], "refit": pick["refit"]},
                "chosen_accuracy": pick["test_accuracy"],
                "best_by_test": {**best["structure"], "refit": best["refit"]},
                "best_accuracy": best["test_accuracy"],
                "chosen_minus_best": [diff, se],
                "fixed_rules_accuracy": fixed["test_accuracy"] if fixed else None,
                "chosen_minus_fixed_rules": [fdiff, fse],
                "oneshot_minus_sequential_mean_accuracy": float(
                    np.mean([r["test_accuracy"] for r in rows if r["refit"] == "oneshot"])
                    - np.mean([r["test_accuracy"] for r in seq])
                ),
                "rows": [{k: v for k, v in r.items() if k != "_correct"} for r in rows],
            }
            cells.append(cell)
            print(
                f"c={c} seed={seed}: chosen {cell['chosen']} {pick['test_accuracy']:.1f} | "
                f"best {cell['best_by_test']} {best['test_accuracy']:.1f} | chosen-best "
                f"{diff:+.1f} ± {se:.1f} | fixed rules "
                f"{cell['fixed_rules_accuracy']} | ρ proxy/seq "
                f"{cell['spearman_proxy_vs_sequential']:.2f}, ρ crit/test "
                f"{cell['spearman_criterion_vs_test_error']:.2f} | one-shot − seq "
                f"{cell['oneshot_minus_sequential_mean_accuracy']:+.2f} ({wall:.0f} s)",
                flush=True,
            )
    (out / "results.json").write_text(
        json.dumps({"task": args.task, "finetune": str(info), "cells": cells}, indent=1)
    )
    lines = [
        f"# Structure search on {args.task}: every candidate fully refit",
        "",
        "| c | seed | chosen | acc | best by test | acc | chosen − best | fixed rules "
        "| chosen − fixed | ρ proxy/sequential | ρ criterion/test error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        d, se = cell["chosen_minus_best"]
        fd, fse = cell["chosen_minus_fixed_rules"]
        fixed = "–" if fd is None else f"{cell['fixed_rules_accuracy']:.1f}"
        fdiff = "–" if fd is None else f"{fd:+.1f} ± {fse:.1f}"
        lines.append(
            f"| {cell['budget']} | {cell['seed']} | {_label(cell['chosen'])} "
            f"| {cell['chosen_accuracy']:.1f} | {_label(cell['best_by_test'])} "
            f"| {cell['best_accuracy']:.1f} | {d:+.1f} ± {se:.1f} | {fixed} | {fdiff} "
            f"| {cell['spearman_proxy_vs_sequential']:.2f} "
            f"| {cell['spearman_criterion_vs_test_error']:.2f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
