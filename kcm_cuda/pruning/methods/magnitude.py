"""magnitude: ||W1[i]||·||W2[:, i]|| (weights only)."""

from __future__ import annotations

from kcm_cuda.pruning.blockwise import map_blocks
from kcm_cuda.pruning.methods.base import ScoreMethod


class Magnitude(ScoreMethod):
    name = "magnitude"

    def scores(self, ctx):
        a = ctx.adapter
        w1 = map_blocks(ctx.teacher, a, lambda b: a.w1(b).weight.detach().double().norm(dim=1))
        return [(n * w.double()).cpu() for n, w in zip(w1, ctx.w2_norms, strict=True)]
