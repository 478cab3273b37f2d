"""kcm_paper: the paper's pipeline as published (Nova et al., ICML 2023) — R2 and D2 merged by
their mean rank per layer (``merge="mean_rank"``, whatever ``merge=`` says) and Scale as its
reconstruction (what ``scale=True`` runs for it)."""

from __future__ import annotations

from kcm_cuda.pruning.methods.base import ScoreMethod
from kcm_cuda.pruning.methods.kcm import r2d2_scores


class KCMPaper(ScoreMethod):
    name = "kcm_paper"
    needs_activations = True
    default_reconstruct = "scale"

    def uses_kernels(self, options) -> bool:
        return True

    def scores(self, ctx):
        return r2d2_scores(ctx, "mean_rank")
