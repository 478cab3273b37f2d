"""Label-free structured pruning (FFN neurons and attention heads) of encoders and decoder LMs:
the measured structure search, the peers (FLAP, Wanda-sp, KCM's R2 / D2, ...), the refits.

prune(model, data, flops=0.6, ...) -> PruneResult
load_pruned(path) -> model
load_report(path) -> the report saved beside it
"""

from kcm_cuda.pruning.api import METHODS, PruneResult, prune
from kcm_cuda.pruning.saving import load_pruned, load_report

__all__ = ["METHODS", "PruneResult", "load_pruned", "load_report", "prune"]
