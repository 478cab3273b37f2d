"""Accuracy and prune time of the default against the number of calibration sentences.

Runs the kcm-eval grid (the fine-tuned model, the task's test rows, seeds) for the default
pruner (``flap`` + ridge) at every calibration size in ``--sizes``: each seed draws the same
pool rows (``GridConfig.samples`` = the largest size), and ``prune()`` draws ``samples = N`` of
them with that seed. Paired differences (same test rows, mean over seeds per row) against the
largest size; the mean prune time and its stages per size. Writes report.json and report.md.

    python benchmarks/calibration_size.py --task vader-movie --budgets 0.6,0.5 \
        --sizes 64,128,256,512,1024,2048 --seeds 2 --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

from kcm_cuda.evaluation.finetune import FinetuneSettings
from kcm_cuda.evaluation.grid import GridConfig
from kcm_cuda.evaluation.runner import run_grid

METHOD = "flap:reconstruct=ridge"


def sized_prune(model, data, flops, **kw):
    """prune() with ``calib=N`` (a method-spec option) as its ``samples``."""
    from kcm_cuda.pruning import prune

    n = kw.pop("calib", None)
    if n is not None:
        kw["samples"] = int(n)
    return prune(model, data, flops, **kw)


def analyse(report: dict, predictions: str) -> dict:
    """Per (budget, size): accuracy (mean over seeds), paired difference vs the largest size
    at that budget (± SE over test rows), mean prune seconds and stage seconds."""
    arrays = np.load(predictions)
    labels = arrays["labels"]
    cells: dict[tuple, list[tuple[dict, np.ndarray]]] = defaultdict(list)
    for i, run in enumerate(report["runs"]):
        key = f"run_{i}"
        if key not in arrays:
            continue
        correct = arrays[key].astype(np.float32).argmax(axis=1) == labels
        cells[(run["budget"], int(run["options"]["calib"]))].append((run, correct))
    rows = []
    for budget in sorted({b for b, _ in cells}, reverse=True):
        sizes = sorted(n for b, n in cells if b == budget)
        ref = np.mean([c for _, c in cells[(budget, sizes[-1])]], axis=0)
        for n in sizes:
            rs = cells[(budget, n)]
            a = np.mean([c for _, c in rs], axis=0)
            d = a - ref
            stages: dict[str, list[float]] = defaultdict(list)
            for run, _ in rs:
                for k, v in (run.get("prune_timings_s") or {}).items():
                    stages[k].append(float(v))
            rows.append(
                {
                    "budget": budget,
                    "samples": n,
                    "seeds": len(rs),
                    "accuracy": float(a.mean()),
                    "vs_largest": float(d.mean()),
                    "vs_largest_se": float(d.std(ddof=1) / np.sqrt(d.size)),
                    "prune_seconds": float(np.mean([r["prune_seconds"] for r, _ in rs])),
                    "stage_seconds": {k: float(np.mean(v)) for k, v in stages.items()},
                }
            )
    return {"largest": max(n for _, n in cells), "rows": rows}


def markdown(report: dict, result: dict, command: str) -> str:
    dense = report["dense"]["accuracy"]
    lines = [
        f"# Calibration size: the default ({METHOD}) on {report['task']['name']}",
        "",
        f"Dense accuracy {100 * dense:.1f} % on {report['task']['sizes']['test']} test rows; "
        f"{report['config']['seeds']} seeds; paired differences against "
        f"{result['largest']} sentences (same rows, mean over seeds per row, ± SE over rows). "
        "Prune seconds are means over seeds on this machine (the first prune of a seed also "
        "fine-tunes nothing: the model is cached).",
        "",
        f"Command: `{command}`",
        "",
        "| c | sentences | acc % | vs largest (pt) | prune s | stages (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
        lines.append(
            f"| {r['budget']} | {r['samples']} | {100 * r['accuracy']:.1f} | "
            f"{100 * r['vs_largest']:+.1f} ± {100 * r['vs_largest_se']:.1f} | "
            f"{r['prune_seconds']:.1f} | {st} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="vader-movie")
    p.add_argument("--budgets", default="0.6,0.5")
    p.add_argument("--sizes", default="64,128,256,512,1024,2048")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="fine-tune epochs (2: make run's)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    budgets = tuple(float(x) for x in args.budgets.split(","))
    config = GridConfig(
        task=args.task,
        budgets=budgets,
        methods=tuple(f"{METHOD},calib={n}" for n in sizes),
        scales=(False,),
        seeds=args.seeds,
        samples=sizes[-1],
        output=args.output,
        save_predictions=True,
        profile="calibration_size",
        finetune=FinetuneSettings(mode="full", epochs=args.epochs),  # the cpu profile's model
    )
    t0 = time.perf_counter()
    report = run_grid(config, prune_fn=sized_prune, log=lambda m: print(m, flush=True))
    result = analyse(report, os.path.join(args.output, "predictions.npz"))
    result["wall_seconds"] = time.perf_counter() - t0
    command = "python benchmarks/calibration_size.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"grid": report, "calibration_size": result}, f, indent=1, default=str)
    with open(os.path.join(args.output, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report, result, command))
    print(markdown(report, result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
