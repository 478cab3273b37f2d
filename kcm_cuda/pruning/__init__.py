"""KCM structured pruning of BERT-family FFN neurons with unlabeled data.

prune(model, data, flops=0.6, ...) -> PruneResult
load_pruned(path) -> model
load_report(path) -> the report saved beside it
"""

from kcm_cuda.pruning.api import METHODS, PruneResult, prune
from kcm_cuda.pruning.saving import load_pruned, load_report

__all__ = ["METHODS", "PruneResult", "load_pruned", "load_report", "prune"]
