"""Accuracy evaluation of KCM pruning: tasks (datasets), fine-tuning (finetune), metrics,
the pruning grid (grid: its plan, runner: running it, scoring: summary and paired
differences), reports (report) and the ``kcm-eval`` command (cli).

Everything here is optional to the pruning library; modules import transformers lazily.
"""

from kcm_cuda.evaluation.metrics import (
    accuracy,
    mean_std_stderr,
    pearson,
    positive_rate,
    roc_auc,
    spearman,
    squad_metrics,
)

__all__ = [
    "accuracy",
    "mean_std_stderr",
    "pearson",
    "positive_rate",
    "roc_auc",
    "spearman",
    "squad_metrics",
]
