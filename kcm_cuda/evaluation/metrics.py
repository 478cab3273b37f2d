"""Metrics of the accuracy evaluation (pure numpy; no scikit-learn needed).

Binary classification: accuracy, ROC-AUC (threshold-free: it does not reward a lucky shift of
the decision bias, see shared/EVALUATION.md §1) and the predicted-positive rate (always printed:
pruning moves it). Regression (the VADER rating, STS-B): Pearson and Spearman correlations.
Question answering: SQuAD v1.1 exact match and token F1 (the official normalisation).
Aggregation over seeds: mean, sample standard deviation and standard error.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "accuracy",
    "classification_metrics",
    "mean_std_stderr",
    "pearson",
    "positive_rate",
    "regression_metrics",
    "roc_auc",
    "spearman",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
]


def _as_1d(name: str, x: object, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same length, got {a.size} and {b.size}")


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Fraction of predictions equal to the labels."""
    y = _as_1d("labels", labels, np.int64)
    p = _as_1d("predictions", predictions, np.int64)
    _same_length(y, p, "labels", "predictions")
    return float(np.mean(y == p))


def positive_rate(predictions: Sequence[int]) -> float:
    """Fraction of predictions that are the positive class (1)."""
    p = _as_1d("predictions", predictions, np.int64)
    return float(np.mean(p == 1))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    boundaries = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [x.size]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)
    return ranks


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half).

    ``labels`` are 0/1, ``scores`` any real numbers where larger means "more positive".
    Raises ValueError when only one class is present (the AUC is undefined)."""
    y = _as_1d("labels", labels, np.int64)
    s = _as_1d("scores", scores)
    _same_length(y, s, "labels", "scores")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1 for roc_auc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes among the labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either input is constant."""
    a = _as_1d("x", x)
    b = _as_1d("y", y)
    _same_length(a, b, "x", "y")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        return float("nan")
    return float(a @ b) / den


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    a = _as_1d("x", x)
    b = _as_1d("y", y)
    _same_length(a, b, "x", "y")
    return pearson(_average_ranks(a), _average_ranks(b))


def classification_metrics(labels: Sequence[int], logits: np.ndarray) -> dict[str, float]:
    """Accuracy (+ ROC-AUC and predicted-positive rate for two classes) from (N, C) logits."""
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, classes), got shape {lg.shape}")
    y = _as_1d("labels", labels, np.int64)
    if lg.shape[0] != y.size:
        raise ValueError(f"logits has {lg.shape[0]} rows but labels has {y.size}")
    pred = lg.argmax(axis=1)
    out = {"accuracy": accuracy(y, pred)}
    if lg.shape[1] == 2:
        margin = lg[:, 1] - lg[:, 0]
        try:
            out["roc_auc"] = roc_auc(y, margin)
        except ValueError:
            out["roc_auc"] = float("nan")
        out["positive_rate"] = positive_rate(pred)
        out["true_positive_rate_of_labels"] = float(np.mean(y == 1))
    return out


def regression_metrics(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    t = _as_1d("targets", targets)
    p = _as_1d("predictions", np.asarray(predictions, dtype=np.float64).reshape(-1))
    _same_length(t, p, "targets", "predictions")
    return {
        "pearson": pearson(t, p),
        "spearman": spearman(t, p),
        "mse": float(np.mean((t - p) ** 2)),
    }


def mean_std_stderr(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value), standard error, n."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        raise ValueError("values must not be empty")
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "stderr": float("nan"), "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {
        "mean": float(v.mean()),
        "std": std,
        "stderr": std / math.sqrt(v.size),
        "n": int(v.size),
    }


# --- SQuAD v1.1 (official evaluation script's normalisation) ---------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth."""
    if isinstance(ground_truths, str) or not ground_truths:
        raise ValueError("ground_truths must be a non-empty list of strings")
    p = _normalize_answer(prediction)
    return float(max(p == _normalize_answer(g) for g in ground_truths))


def _f1_one(prediction: str, truth: str) -> float:
    p = _normalize_answer(prediction).split()
    t = _normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(p)
    recall = same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching ground truth."""
    if isinstance(ground_truths, str) or not ground_truths:
        raise ValueError("ground_truths must be a non-empty list of strings")
    return max(_f1_one(prediction, g) for g in ground_truths)


def squad_metrics(
    predictions: dict[str, str], references: dict[str, Sequence[str]]
) -> dict[str, float]:
    """Corpus exact match and F1, in percent, over the ids of ``references``."""
    if not references:
        raise ValueError("references must not be empty")
    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"predictions lack {len(missing)} ids, e.g. {missing[:3]}")
    em = [squad_exact_match(predictions[k], v) for k, v in references.items()]
    f1 = [squad_f1(predictions[k], v) for k, v in references.items()]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}
