"""r2: representative ranking from the weights alone (C_ii of the kernelized convex hull)."""

from __future__ import annotations

from kcm_cuda.pruning.methods.base import ScoreMethod


class R2(ScoreMethod):
    name = "r2"

    def uses_kernels(self, options) -> bool:
        return True

    def scores(self, ctx):
        return ctx.r2()
