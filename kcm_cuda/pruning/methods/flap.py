"""flap (An et al., "Fluctuation-based Adaptive Structured Pruning", AAAI 2024), FFN neurons.

Score of neuron i of a layer: its fluctuation Var_tokens(a_i) · ‖W2[:, i]‖² (the variance of
the neuron's activation over the sample's real tokens, times the energy of its output
column: how much the layer's output would move if the neuron were replaced by its mean).
The scores are standardised per layer, (s − mean_layer) / std_layer, and sorted globally
(FLAP's adaptive structure search), so layers with a flat profile give up more neurons.
FLAP's bias compensation, b2 += W2[:, pruned] · mean(a_pruned), is the reconstruction
``reconstruct="bias"`` (FLAP as published: ``method="flap", reconstruct="bias"``). With
``scale=True`` and no ``reconstruct=``, flap gets the project's default reconstruction (ridge):
``prune(model, data)`` is flap + ridge, the measured default.
"""

from __future__ import annotations

import torch

from kcm_cuda.pruning.activations import ActivationStats, token_variances
from kcm_cuda.pruning.allocation import standardise
from kcm_cuda.pruning.methods.base import ScoreMethod, times_w2_norm


def fluctuation_scores(stats: ActivationStats, w2_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (n,) float64: Var_tokens(a_i) · ‖W2[:, i]‖² (not standardised)."""
    return times_w2_norm(token_variances(stats), w2_norms, power=2)


def flap_scores(stats: ActivationStats, w2_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """FLAP's globally comparable scores: fluctuation standardised per layer."""
    return standardise(fluctuation_scores(stats, w2_norms))


class FLAP(ScoreMethod):
    name = "flap"
    needs_activations = True

    def scores(self, ctx):
        return flap_scores(ctx.activation_stats(), ctx.w2_norms)

    def layer_scores(self, stats, w2_norms):
        return flap_scores(stats, w2_norms)
