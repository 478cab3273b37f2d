"""The pipeline's expensive statistics passes, looked up here at call time.

``PruneContext`` (kcm_cuda.pruning.context) calls these three through this module, so a tool
can wrap them for a while (the evaluation's ``score_memo`` memoises them by content across the
cells of a grid) without the pruning stages importing ``api``. Imports only downward.
"""

from __future__ import annotations

from kcm_cuda.pruning.activations import collect_activation_stats
from kcm_cuda.pruning.heads import collect_head_stats
from kcm_cuda.pruning.r2 import r2_scores

__all__ = ["collect_activation_stats", "collect_head_stats", "r2_scores"]
