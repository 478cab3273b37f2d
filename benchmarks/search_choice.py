"""How well does the default's structure search choose? For every cell (budget × seed), the
default (``prune()`` as called: the cross-fitted search) and every candidate it judged, each
built as the default would build it (fixed to that structure: the sequential refit on every
row), scored on labelled test rows the search never saw.

    python -m benchmarks.search_choice --task vader-amazon --finetuned DIR \
        --budgets 0.8,0.7,0.6,0.5,0.4,0.3 --seeds 3 --samples 512 --output DIR
    python -m benchmarks.search_choice --task lm-vader --budgets ... --output DIR

Classifiers: test accuracy (the fine-tune kcm-eval caches: its report.json's
finetune.cache_path); causal LMs (lm-vader, lm-vader-deep): mean NLL per held-out token
(sliding windows, as kcm-eval). Per cell: the chosen candidate, the best candidate by test,
chosen − best (paired over test rows / windows, ± SE; 0 when the choice is the best), the
fixed rules' candidate (flap, uniform widths, heads with the per_mac split at c ≤ 0.7) and
chosen − fixed rules. Summary: the hit rate (chosen = best, or within one paired SE of it)
and the mean chosen − best per budget. Writes results.json and report.md.
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
    return f"{st['method']} {st['allocation']} {heads}"


def _key(st: dict) -> str:
    return json.dumps({k: v for k, v in st.items() if k != "refit"}, sort_keys=True)


def _fixed_rule(c: float) -> dict:
    st = {"method": "flap", "allocation": "uniform", "heads": c <= 0.7}
    if c <= 0.7:
        st["head_split"] = "per_mac"
    return st


class ClassifierTask:
    higher_is_better = True
    unit = "pt"

    def __init__(self, task: str, finetuned: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from kcm_cuda.evaluation.datasets import get_task
        from kcm_cuda.evaluation.modeling import SentenceClassifier, tokenize

        self.task = get_task(task)
        self.tok = AutoTokenizer.from_pretrained(finetuned)
        self.model = AutoModelForSequenceClassification.from_pretrained(finetuned).eval()
        self._clf = SentenceClassifier
        self.test = tokenize(self.tok, [e.text for e in self.task.test], max_length=128)
        self.y = np.array([e.label for e in self.task.test])
        self.data = self.task.pool
        self.kw = {"tokenizer": self.tok}

    def score(self, model) -> np.ndarray:
        """Per test row: 1 correct, 0 wrong."""
        from kcm_cuda.evaluation.modeling import predict

        return (predict(self._clf(model), self.test).argmax(1) == self.y).astype(float)

    def value(self, per_row: np.ndarray) -> float:
        return float(per_row.mean() * 100)

    def diff(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        d = (a - b) * 100
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


class LMTask:
    higher_is_better = False
    unit = "nats/token"

    def __init__(self, task: str, samples: int, max_test_tokens: int | None = None) -> None:
        from kcm_cuda.evaluation.lm_data import encode_stream, load_lm_text
        from kcm_cuda.evaluation.lm_grid import LMGridConfig, load_lm
        from kcm_cuda.evaluation.lm_train import pack_blocks

        cfg = LMGridConfig(task=task)
        text = load_lm_text(cfg.text_name, None)
        self.model, tok, _ = load_lm(cfg, text, print)
        self.model.eval()
        positions = self.model.config.max_position_embeddings
        self.window, self.stride = positions, positions // 2
        self.test_ids = encode_stream(tok, text.test)
        if max_test_tokens:
            self.test_ids = self.test_ids[:max_test_tokens]
        calib = pack_blocks(encode_stream(tok, text.calibration), min(128, positions))
        self.data = {"input_ids": calib, "attention_mask": torch.ones_like(calib)}
        self.kw = {"max_length": calib.shape[1]}
        self.rows = calib.shape[0]

    def score(self, model) -> np.ndarray:
        """Per window: summed NLL and tokens (stacked)."""
        from kcm_cuda.evaluation.perplexity import sliding_window_nll

        r = sliding_window_nll(model, self.test_ids, window=self.window, stride=self.stride)
        return np.stack([r["window_nll"], r["window_tokens"].astype(float)])

    def value(self, per_window: np.ndarray) -> float:
        return float(per_window[0].sum() / per_window[1].sum())

    def diff(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        tok = a[1]
        d = a[0] - b[0]
        n = len(d)
        mean = float(d.sum() / tok.sum())
        se = float(d.std(ddof=1) * math.sqrt(n) / tok.sum())
        return mean, se


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_choice", description=__doc__)
    p.add_argument("--task", default="vader-amazon")
    p.add_argument("--finetuned", default=None, help="classifier tasks: the fine-tuned model")
    p.add_argument("--budgets", default="0.8,0.7,0.6,0.5,0.4,0.3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--output", required=True)
    p.add_argument("--prune-option", action="append", default=[], help="KEY=VALUE (JSON value)")
    p.add_argument("--max-test-tokens", type=int, default=None, help="LMs: cap the test text")
    args = p.parse_args(argv)
    import kcm_cuda

    extra = {}
    for item in args.prune_option:
        k, _, v = item.partition("=")
        extra[k] = json.loads(v)
    if args.task.startswith("lm-"):
        t = LMTask(args.task, args.samples, args.max_test_tokens)
        samples = min(args.samples, t.rows)
    else:
        if not args.finetuned:
            p.error("--finetuned is needed for a classifier task")
        t = ClassifierTask(args.task, args.finetuned)
        samples = args.samples
    dense = t.score(t.model)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    sign = 1 if t.higher_is_better else -1
    for seed in range(args.seeds):
        cache: dict = {}
        for c in [float(x) for x in args.budgets.split(",")]:
            common = dict(seed=seed, samples=samples, progress=False, cache=cache, **t.kw)
            t0 = time.perf_counter()
            r = kcm_cuda.prune(t.model, t.data, c, **common, **extra)
            default_s = time.perf_counter() - t0
            block = r.report["structure"]
            chosen = block.get("chosen")
            scores = {}
            if chosen is None:
                print(f"c={c} seed={seed}: not searched ({block.get('not_searched')})")
                continue
            scores[_key(chosen)] = t.score(r.model)
            del r
            for cand in block["candidates"]:
                st = cand["structure"]
                if "skipped" in cand or "same_masks_as" in cand or _key(st) in scores:
                    continue
                ex = {"head_split": st["head_split"]} if st.get("heads") else {}
                m = kcm_cuda.prune(
                    t.model, t.data, c, method=st["method"], allocation=st["allocation"],
                    heads=st["heads"], experimental=ex, structure="fixed", **common,
                ).model  # fmt: skip
                scores[_key(st)] = t.score(m)
                del m
            values = {k: t.value(v) for k, v in scores.items()}
            best = max(values, key=lambda k: sign * values[k])
            ck = _key(chosen)
            diff, se = (0.0, 0.0) if best == ck else t.diff(scores[ck], scores[best])
            fk = _key(_fixed_rule(c))
            fixed = t.diff(scores[ck], scores[fk]) if fk in scores and fk != ck else (0.0, 0.0)
            hit = best == ck or abs(diff) <= se
            cell = {
                "budget": c,
                "seed": seed,
                "chosen": chosen,
                "chosen_value": values[ck],
                "best_by_test": json.loads(best),
                "best_value": values[best],
                "chosen_minus_best": [diff, se],
                "hit": bool(hit),
                "fixed_rules": _fixed_rule(c),
                "fixed_rules_value": values.get(fk),
                "chosen_minus_fixed_rules": list(fixed),
                "tie_rule": block.get("tie_rule", {}).get("applied"),
                "judged_rows": block.get("judged_rows"),
                "judged_tokens": block.get("judged_tokens"),
                "candidates": {k: values[k] for k in values},
                "default_prune_s": default_s,
            }
            cells.append(cell)
            print(
                f"c={c} seed={seed}: chosen {_label(chosen)} {values[ck]:.4g} | best "
                f"{_label(cell['best_by_test'])} {values[best]:.4g} | chosen−best {diff:+.3g} ± "
                f"{se:.2g} | vs fixed {fixed[0]:+.3g} ± {fixed[1]:.2g} | {default_s:.0f} s",
                flush=True,
            )
    summary = {}
    for c in sorted({cell["budget"] for cell in cells}, reverse=True):
        cs = [x for x in cells if x["budget"] == c]
        summary[str(c)] = {
            "hit_rate": sum(x["hit"] for x in cs) / len(cs),
            "mean_chosen_minus_best": float(np.mean([x["chosen_minus_best"][0] for x in cs])),
            "mean_chosen_minus_fixed": float(
                np.mean([x["chosen_minus_fixed_rules"][0] for x in cs])
            ),
            "cells": len(cs),
        }
    result = {
        "task": args.task,
        "finetuned": args.finetuned,
        "unit": t.unit,
        "higher_is_better": t.higher_is_better,
        "dense_value": t.value(dense),
        "samples": samples,
        "prune_options": extra,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": {"torch": torch.__version__, "kcm_cuda": kcm_cuda.__version__},
        "cells": cells,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# The default's structure choice on {args.task} ({samples} rows; test in {t.unit}, "
        f"dense {t.value(dense):.4g})",
        "",
        "| c | seed | chosen | value | best by test | value | chosen − best | hit "
        "| chosen − fixed rules |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in cells:
        d, se = x["chosen_minus_best"]
        fd, fse = x["chosen_minus_fixed_rules"]
        lines.append(
            f"| {x['budget']} | {x['seed']} | {_label(x['chosen'])} | {x['chosen_value']:.4g} "
            f"| {_label(x['best_by_test'])} | {x['best_value']:.4g} | {d:+.3g} ± {se:.2g} "
            f"| {'yes' if x['hit'] else 'no'} | {fd:+.3g} ± {fse:.2g} |"
        )
    lines += ["", "| c | hit rate | mean chosen − best | mean chosen − fixed rules |",
              "|---|---|---|---|"]  # fmt: skip
    for c, s in summary.items():
        lines.append(
            f"| {c} | {s['hit_rate']:.0%} ({s['cells']}) | {s['mean_chosen_minus_best']:+.3g} "
            f"| {s['mean_chosen_minus_fixed']:+.3g} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
