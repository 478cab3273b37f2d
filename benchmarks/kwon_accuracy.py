"""Accuracy of the LABELLED ``kwon`` anchor (Kwon et al. 2022) against ``d2`` on the embedded
task, paired on the same test rows.

Per seed: kwon draws ``--samples`` labelled TRAIN examples (the seed changes the sample) and
prunes heads + neurons; d2 (Scale on, the project's default reconstruction) draws the same
number of unlabeled POOL sentences with the same seed. Both are scored on the whole test split.
Writes report.json / report.md / console log under --output.

    PYTHONPATH=$PWD python benchmarks/kwon_accuracy.py --budgets 0.7 0.6 0.5 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.6, 0.5])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="instead of 0..seeds-1")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="only combine the report.json files of these output folders into --output",
    )
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=["kwon", "d2"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/cpu-amd-epyc/kwon")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kcm_cuda.evaluation.datasets import get_task
    from kcm_cuda.evaluation.finetune import FinetuneSettings, finetune, split_metrics
    from kcm_cuda.evaluation.modeling import (
        SentenceClassifier,
        mean_pool,
        predict,
        resolve_model_path,
        tokenize,
    )
    from kcm_cuda.evaluation.runner import _onednn_disabled
    from kcm_cuda.pruning import prune

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args, out)
    log_path = out / "console.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    log("argv: " + " ".join(sys.argv))
    task = get_task("vader-movie")
    log("task: " + json.dumps(task.sizes()))
    # The cached full fine-tune of kcm-eval's cpu profile (2 epochs, 6-minute budget).
    settings = FinetuneSettings(mode="full", epochs=2, time_budget_s=360.0)
    clf, info, tok = finetune(task, resolve_model_path(None), settings, log=log)
    if not info.get("cached"):
        log("WARNING: the fine-tune was not found in the cache and was rebuilt")
    clf.eval()
    test = tokenize(tok, [e.text for e in task.test], max_length=128, batch_size=128)
    y = np.array([int(e.label) for e in task.test])
    dense_logits = predict(clf, test, "cpu")
    dense = split_metrics(task, dense_logits, task.test)
    log(f"dense: {dense}")
    head = clf.head

    def classifier(hidden, mask):  # the evaluation model's head: mean pool → linear
        return head(mean_pool(hidden, mask))

    train_texts = [e.text for e in task.train]
    train_labels = [int(e.label) for e in task.train]
    pool = list(task.pool)
    runs = []
    done = set()
    if (out / "report.json").is_file() and (out / "correct.npz").is_file():  # resume
        rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
        corr = np.load(out / "correct.npz")
        for r in rep["runs"]:
            r["correct"] = corr[f"{r['method']}_c{r['budget']:g}_s{r['seed']}"].tolist()
            runs.append(r)
            done.add((r["method"], r["budget"], r["seed"]))
        log(f"resuming: {len(runs)} finished runs in {out}")
    with _onednn_disabled():
        for seed in args.seed_list if args.seed_list is not None else range(args.seeds):
            for c in args.budgets:
                for m in args.methods:
                    if (m, c, seed) in done:
                        continue
                    t0 = time.perf_counter()
                    if m == "kwon":
                        r = prune(
                            clf.encoder,
                            train_texts,
                            c,
                            method="kwon",
                            labels=train_labels,
                            classifier=classifier,
                            tokenizer=tok,
                            samples=args.samples,
                            seed=seed,
                            progress=False,
                        )
                    else:
                        r = prune(
                            clf.encoder,
                            pool,
                            c,
                            method=m,
                            tokenizer=tok,
                            samples=args.samples,
                            seed=seed,
                            progress=False,
                        )
                    secs = time.perf_counter() - t0
                    pruned = SentenceClassifier(r.model, task.num_labels)
                    pruned.head = head
                    logits = predict(pruned.eval(), test, "cpu")
                    acc = float((logits.argmax(1) == y).mean())
                    rep = r.report
                    run = {
                        "method": m,
                        "budget": c,
                        "seed": seed,
                        "accuracy": acc,
                        "metrics": split_metrics(task, logits, task.test),
                        "flops_ratio": rep["flops"]["ratio"],
                        "uses_labels": rep.get("uses_labels"),
                        "heads_kept_per_layer": rep.get("heads_kept_per_layer"),
                        "kept_per_layer": rep["kept_per_layer"],
                        "prune_seconds": secs,
                        "timings_s": rep["timings_s"],
                        "selection": rep.get("selection"),
                        "correct": (logits.argmax(1) == y).astype(int).tolist(),
                    }
                    runs.append(run)
                    sel = rep.get("selection") or {}
                    log(
                        f"c={c:g} {m} seed={seed}: acc {100 * acc:.2f} FLOPs "
                        f"{rep['flops']['ratio']:.4f} heads {rep.get('heads_kept_per_layer')} "
                        f"neurons {rep['kept_per_layer']} ({secs:.0f}s)"
                        + (f" tuning_stopped={sel.get('tuning_stopped')}" if sel else "")
                    )
                    write(out, args, dense, runs, y)
    return 0


def merge(args, out: Path) -> int:
    """Combine finished runs of several output folders (e.g. seeds run in parallel)."""
    runs, dense, y = [], None, None
    for d in args.merge:
        rep = json.loads((Path(d) / "report.json").read_text(encoding="utf-8"))
        corr = np.load(Path(d) / "correct.npz")
        y = corr["labels"]
        dense = rep["dense"]
        args.samples = rep["samples"]
        for r in rep["runs"]:
            r["correct"] = corr[f"{r['method']}_c{r['budget']:g}_s{r['seed']}"].tolist()
            runs.append(r)
    write(out, args, dense, runs, y)
    return 0


def _paired(runs, a: str, b: str, c: float):
    """Per seed acc(a) − acc(b) on the same test rows; mean ± SE over seeds."""
    by = {(r["method"], r["seed"]): r for r in runs if r["budget"] == c}
    diffs = [
        100 * (by[(a, s)]["accuracy"] - by[(b, s)]["accuracy"])
        for (m, s) in by
        if m == a and (b, s) in by
    ]
    if not diffs:
        return None
    mean = float(np.mean(diffs))
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return mean, se, len(diffs)


def write(out: Path, args, dense, runs, y) -> None:
    dense_acc = 100 * dense["accuracy"]
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lines = [
        "# kwon (LABELLED: uses labels) vs d2, vader-movie, all-MiniLM-L6-v2 full fine-tune",
        "",
        f"Machine: this 2-core CPU ({platform.machine()}), torch {torch.__version__}. "
        f"Dense test accuracy {dense_acc:.2f}% ({len(y)} test sentences). "
        f"{args.samples} examples per seed: kwon = labelled TRAIN rows, d2 = unlabeled POOL "
        "rows (Scale on). Accuracy in %, mean ± SE over seeds; paired = same test rows, per-seed "
        "difference.",
        "",
        "| c | method | uses labels | accuracy | Δ vs dense | seeds | FLOPs ratio "
        "| heads kept (of 72) "
        "| prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in budgets:
        for m in methods:
            rs = [r for r in runs if r["budget"] == c and r["method"] == m]
            if not rs:
                continue
            acc = np.array([100 * r["accuracy"] for r in rs])
            se = acc.std(ddof=1) / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
            heads = [sum(r["heads_kept_per_layer"]) for r in rs if r["heads_kept_per_layer"]]
            heads_str = f"{np.mean(heads):.1f}" if heads else "all"
            lines.append(
                f"| {c:g} | {m} | {'yes' if rs[0]['uses_labels'] else 'no'} | "
                f"{acc.mean():.2f} ± {se:.2f} | {acc.mean() - dense_acc:+.2f} | {len(rs)} | "
                f"{np.mean([r['flops_ratio'] for r in rs]):.4f} | "
                f"{heads_str} | "
                f"{np.mean([r['prune_seconds'] for r in rs]):.0f} |"
            )
    lines += ["", "Paired kwon − d2 (pt):", ""]
    for c in budgets:
        d = _paired(runs, "kwon", "d2", c)
        if d is not None:
            lines.append(f"- c = {c:g}: {d[0]:+.2f} ± {d[1]:.2f} (n = {d[2]} seeds)")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    slim = [{k: v for k, v in r.items() if k != "correct"} for r in runs]
    (out / "report.json").write_text(
        json.dumps({"dense": dense, "samples": args.samples, "runs": slim}, indent=1),
        encoding="utf-8",
    )
    np.savez_compressed(
        out / "correct.npz",
        labels=y,
        **{f"{r['method']}_c{r['budget']:g}_s{r['seed']}": np.array(r["correct"]) for r in runs},
    )


if __name__ == "__main__":
    raise SystemExit(main())
