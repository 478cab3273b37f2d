"""kcm: R2D2 — the D2 and R2 scores merged (``merge=``, default: D2 votes, R2 breaking ties)."""

from __future__ import annotations

from kcm_cuda.pruning.merge import merge_scores
from kcm_cuda.pruning.methods.base import ScoreMethod


def r2d2_scores(ctx, merge: str):
    d2, r2 = ctx.d2(), ctx.r2()
    o = ctx.options
    return merge_scores(
        r2,
        d2.scores,
        d2.energy,
        merge=merge,
        r2_weight=o.experimental.r2_weight,
        bins=o.experimental.merge_bins,
        d2_votes=d2.votes,
        vote_step=d2.vote_step,
    )


class KCM(ScoreMethod):
    name = "kcm"
    needs_activations = True

    def uses_kernels(self, options) -> bool:
        return True

    def scores(self, ctx):
        return r2d2_scores(ctx, ctx.options.experimental.merge)
