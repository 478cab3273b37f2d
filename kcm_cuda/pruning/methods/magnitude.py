"""magnitude: ||W1[i]||·||W2[:, i]|| (weights only)."""

from __future__ import annotations

from kcm_cuda.pruning.methods.base import ScoreMethod


class Magnitude(ScoreMethod):
    name = "magnitude"

    def scores(self, ctx):
        a = ctx.adapter
        return [
            (a.w1(b).weight.detach().double().norm(dim=1) * w.double()).cpu()
            for b, w in zip(a.layers(ctx.teacher), ctx.w2_norms, strict=True)
        ]
