"""D2 — data-driven ranking from the unpruned model's activations on unlabeled data.

Output energy of neuron i on batch b: e_i(b) = ||a_i over the real tokens of b||₂ · ||W2[:, i]||₂.
``mode="votes"`` (default): each batch votes for the top-k_l neurons of each layer (k_l the
layer's share of the kept budget); S_D2(i) = fraction of batches voting for i, ties broken by
mean energy. ``mode="energy"``: S_D2(i) = mean energy over batches (no voting).
``mode="kcm"``: the R2 procedure on each of the first batches' activations (see
activations.py); each of those batches votes for the top-k_l neurons by C_ii; ties by mean
energy.
The returned scores are comparable across layers (used directly by the global top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kcm_cuda.pruning.activations import ActivationStats

D2_MODES = ("votes", "energy", "kcm")


def batch_energies(stats: ActivationStats, w2_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (n_batches, n) float64: e_i(b)."""
    return [
        sq.clamp_min(0).sqrt() * w.double().cpu().unsqueeze(0)
        for sq, w in zip(stats.sq_sums, w2_norms, strict=True)
    ]


def mean_energy(energies: list[torch.Tensor]) -> list[torch.Tensor]:
    return [e.mean(dim=0) for e in energies]


def vote_fractions(energies: list[torch.Tensor], quotas: list[int]) -> list[torch.Tensor]:
    out = []
    for e, k in zip(energies, quotas, strict=True):
        n_batches, n = e.shape
        k = max(0, min(int(k), n))
        votes = torch.zeros(n, dtype=torch.float64)
        if k > 0:
            top = torch.topk(e, k, dim=1).indices  # (n_batches, k)
            votes.index_add_(0, top.flatten(), torch.ones(top.numel(), dtype=torch.float64))
        out.append(votes / n_batches)
    return out


def combine_with_tiebreak(
    primary: list[torch.Tensor], secondary: list[torch.Tensor], step: float
) -> list[torch.Tensor]:
    """primary + a global [0, step/2) rescaling of ``secondary``: orders by primary, then by
    secondary, with no cross-over between primary values ``step`` apart."""
    flat = torch.cat(secondary)
    lo, hi = float(flat.min()), float(flat.max())
    span = hi - lo if hi > lo else 1.0
    return [p + 0.5 * step * (s - lo) / span for p, s in zip(primary, secondary, strict=True)]


@dataclass
class D2Result:
    scores: list[torch.Tensor]  # global D2 score per layer (votes + energy tie-break, or energy)
    energy: list[torch.Tensor]  # mean output energy per neuron
    votes: list[torch.Tensor] | None  # vote fractions (mode "votes")
    vote_step: float  # 1 / n_batches


def d2_scores(
    stats: ActivationStats,
    w2_norms: list[torch.Tensor],
    quotas: list[int],
    mode: str = "votes",
) -> D2Result:
    """Global D2 scores, mean energies and vote fractions per layer, float64."""
    if mode not in D2_MODES:
        raise ValueError(f"d2_mode must be one of {D2_MODES}, got {mode!r}")
    energies = batch_energies(stats, w2_norms)
    mean_e = mean_energy(energies)
    step = 1.0 / stats.n_batches
    if mode == "energy":
        return D2Result(mean_e, mean_e, None, step)
    if mode == "kcm":
        if stats.kcm_diag is None:
            raise ValueError("d2_mode='kcm' needs activation statistics with kcm_batches > 0")
        votes = vote_fractions(stats.kcm_diag, quotas)
        step = 1.0 / stats.kcm_diag[0].shape[0]
        return D2Result(combine_with_tiebreak(votes, mean_e, step), mean_e, votes, step)
    votes = vote_fractions(energies, quotas)
    return D2Result(combine_with_tiebreak(votes, mean_e, step), mean_e, votes, step)
