"""wanda_sp: the structured Wanda score (as FLAP's baseline "Wanda-sp"), FFN neurons.

Score of neuron i: ‖W2[:, i]‖₂ · ‖a_i‖₂, with ‖a_i‖₂ over the sample's real tokens (the
energy of the neuron's contribution to the layer's output, by Cauchy-Schwarz an upper bound
of it). All layers see the same tokens, so the scores are sorted globally as they are.
Measured with and without bias compensation (``reconstruct="bias"`` / ``"none"``).
"""

from __future__ import annotations

import torch

from kcm_cuda.pruning.activations import ActivationStats, token_norms
from kcm_cuda.pruning.methods.base import ScoreMethod, times_w2_norm


def wanda_sp_scores(stats: ActivationStats, w2_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (n,) float64: ‖W2[:, i]‖₂ · ‖a_i‖₂."""
    return times_w2_norm(token_norms(stats), w2_norms)


class WandaSP(ScoreMethod):
    name = "wanda_sp"
    needs_activations = True

    def scores(self, ctx):
        return wanda_sp_scores(ctx.activation_stats(), ctx.w2_norms)

    def layer_scores(self, stats, w2_norms):
        return wanda_sp_scores(stats, w2_norms)
