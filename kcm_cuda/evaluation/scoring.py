"""Scoring the grid's runs: one summary row per (budget, method, Scale) over seeds, the drop vs
dense, and accuracy differences paired over the test examples (against random, d2, the same
method without Scale, and the best label-free peer of each budget); the per-run test logits
for later paired analyses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kcm_cuda.evaluation.grid import default_reconstruction
from kcm_cuda.evaluation.metrics import mean_std_stderr


def default_rows(rows: list[dict], default: str) -> list[dict]:
    """The rows that run prune()'s defaults: the default method with no other option and, when
    one of them ran the default reconstruction, only those (FLAP as published or the default
    method without reconstruction are then peers like any other)."""
    cands = [
        r
        for r in rows
        if r.get("base_method") == default
        and not {k for k in (r.get("options") or {}) if k != "reconstruct"}
    ]
    recon = default_reconstruction(default)
    exact = [r for r in cands if recon is not None and r.get("reconstruct") == recon]
    return exact or cands


def _what_ran(runs: Sequence[dict], seeds_planned: int) -> dict:
    """What the grid actually ran (the report header shows this, not the configuration)."""
    per_cell: dict[tuple, int] = {}
    for r in runs:
        key = (r["budget"], r["method"], r["scale"])
        per_cell[key] = per_cell.get(key, 0) + 1
    counts = sorted(set(per_cell.values()))
    return {
        "runs": len(runs),
        "cells": len(per_cell),
        "seeds_planned": seeds_planned,
        "seeds_per_cell": counts,
        "reconstructions": sorted({r.get("reconstruct", "none") for r in runs}),
        "uses_labels": sorted({r["method"] for r in runs if r.get("uses_labels")}),
        "runs_with_reused_stages": sum(1 for r in runs if r.get("reused_stages")),
        "runs_with_reused_eval": sum(1 for r in runs if r.get("reused_eval")),
    }


def summarise(
    runs: Sequence[dict], dense: dict, metric_names: Sequence[str], default: str = "kcm"
) -> list[dict]:
    """One row per (budget, method, scale): mean / std / stderr of each metric over seeds,
    the drop vs dense, mean prune time and FLOPs ratio, the reconstruction that ran, whether the
    method used labels, the stages reused from earlier runs, and paired accuracy differences
    (``default``: the project's default method, excluded from the label-free peers)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["budget"], r["method"], r["scale"]), []).append(r)
    rows = []
    for (c, m, s), rs in groups.items():
        row = {
            "budget": c,
            "method": m,
            "base_method": rs[0].get("base_method", m.split(":")[0]),
            "options": dict(rs[0].get("options") or {}),
            "scale": s,
            "n_seeds": len(rs),
            "reconstruct": "/".join(sorted({r.get("reconstruct", "none") for r in rs})),
            "uses_labels": any(r.get("uses_labels") for r in rs),
            "reused_stages": sorted({x for r in rs for x in r.get("reused_stages") or []}),
        }
        for name in metric_names:
            vals = [r["metrics"].get(name, float("nan")) for r in rs]
            row[name] = mean_std_stderr(vals)
            if name in dense and name not in ("positive_rate", "mse"):
                row[name]["drop_vs_dense"] = dense[name] - row[name]["mean"]
        row["prune_seconds"] = mean_std_stderr([r["prune_seconds"] for r in rs])
        ratios = [r["flops_ratio"] for r in rs if r.get("flops_ratio") is not None]
        row["flops_ratio"] = float(np.mean(ratios)) if ratios else None
        row["identical_masks_across_seeds"] = len({r["mask_digest"] for r in rs}) == 1
        rows.append(row)
    _paired_differences(rows, groups)
    _best_peer_differences(rows, groups, default)
    return rows


PAIRED_REFERENCES = ("random", "d2", "no Scale")


def _paired_differences(rows: list[dict], groups: dict[tuple, list[dict]]) -> None:
    """Accuracy difference to each reference, paired over the test examples:
    d_i = (mean over seeds of A correct on i) - (same for the reference), stderr =
    sd(d) / sqrt(N). This removes the test-set noise the two share, which the seed standard
    error does not see. References: ``random`` and ``d2`` (same budget, Scale off), and for a
    row with Scale on, ``no Scale`` (the same method and budget without Scale)."""
    for row in rows:
        rs = groups[(row["budget"], row["method"], row["scale"])]
        if any(r.get("_correct") is None for r in rs):
            continue
        a = np.mean([r["_correct"] for r in rs], axis=0)
        row["paired_accuracy_diff"] = {}
        for ref in PAIRED_REFERENCES:
            if ref == "no Scale":
                if not row["scale"]:
                    continue
                ref_runs = groups.get((row["budget"], row["method"], False))
            else:
                if row["method"] == ref and not row["scale"]:
                    continue
                ref_runs = groups.get((row["budget"], ref, False))
            if not ref_runs or any(r.get("_correct") is None for r in ref_runs):
                continue
            b = np.mean([r["_correct"] for r in ref_runs], axis=0)
            d = a - b
            row["paired_accuracy_diff"][ref] = {
                "diff": float(d.mean()),
                "stderr": float(d.std(ddof=1) / np.sqrt(d.size)),
            }


BEST_PEER = "best label-free peer"


def _correct_mean(rs: list[dict]) -> np.ndarray | None:
    if not rs or any(r.get("_correct") is None for r in rs):
        return None
    return np.mean([r["_correct"] for r in rs], axis=0)


def _best_peer_differences(rows: list[dict], groups: dict[tuple, list[dict]], default: str):
    """Per budget, the paired accuracy difference of every row to the BEST label-free peer at
    that budget: peers are the label-free rows other than the one that runs the project's
    defaults (``default`` method with its default reconstruction; FLAP as published, or the
    default method without reconstruction, are peers), the best the one with the highest
    mean accuracy. Stored in
    ``paired_accuracy_diff[BEST_PEER]`` with the peer's name; the best peer's own row has no
    entry (nothing to compare to), and each budget's choice goes to ``best_peer``."""
    by_budget: dict = {}
    for row in rows:
        by_budget.setdefault(row["budget"], []).append(row)
    for _c, brows in by_budget.items():
        defaults = default_rows(brows, default)
        peers = [
            r
            for r in brows
            if not r.get("uses_labels")
            and not any(r is d for d in defaults)
            and (r.get("accuracy") or {}).get("mean") is not None
            and _correct_mean(groups[(r["budget"], r["method"], r["scale"])]) is not None
        ]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["accuracy"]["mean"])
        b = _correct_mean(groups[(best["budget"], best["method"], best["scale"])])
        label = best["method"] + (f" ({best['reconstruct']})" if best["scale"] else "")
        for row in brows:
            row["best_peer"] = label
            if row is best:
                continue
            a = _correct_mean(groups[(row["budget"], row["method"], row["scale"])])
            if a is None:
                continue
            d = a - b
            row.setdefault("paired_accuracy_diff", {})[BEST_PEER] = {
                "diff": float(d.mean()),
                "stderr": float(d.std(ddof=1) / np.sqrt(d.size)),
                "peer": label,
            }


def save_predictions(runs: Sequence[dict], dense_logits: np.ndarray, path, labels=None) -> None:
    """Per-run test logits (float16, original test order) for later paired analyses:
    ``dense``, ``run_<i>`` (i = index in report["runs"]) and ``labels``."""
    arrays = {"dense": dense_logits.astype(np.float16)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    for i, r in enumerate(runs):
        if r.get("_logits") is not None:
            arrays[f"run_{i}"] = r["_logits"].astype(np.float16)
    np.savez_compressed(path, **arrays)
