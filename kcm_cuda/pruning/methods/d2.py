"""d2: data-driven votes of the unpruned model's per-batch output energies (``d2_mode=``)."""

from __future__ import annotations

from kcm_cuda.pruning.methods.base import ScoreMethod


class D2(ScoreMethod):
    name = "d2"
    needs_activations = True

    def uses_kernels(self, options) -> bool:
        return options.experimental.d2_mode == "kcm"

    def scores(self, ctx):
        return ctx.d2().scores
