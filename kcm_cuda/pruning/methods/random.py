"""random: uniform random scores drawn with ``seed`` (the floor every method must beat)."""

from __future__ import annotations

import torch

from kcm_cuda.pruning.methods.base import ScoreMethod


class Random(ScoreMethod):
    name = "random"

    def scores(self, ctx):
        gen = torch.Generator().manual_seed(ctx.options.seed)
        return [torch.rand(n, generator=gen, dtype=torch.float64) for n in ctx.sizes]
