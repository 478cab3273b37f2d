"""R2D2 — merging the per-layer R2 and D2 scores into one globally comparable score.

Variants (``merge=``), each returns float64 scores per layer for the global top-k:
  "mean_rank"        per layer, R2 and D2 turned into ranks normalised to [0, 1] (1 = best) and
                     averaged (Borda); the global top-k on these keeps ~the same ratio per layer.
  "energy_weighted"  mean_rank × the layer's D2 energy share (layer energy / mean layer energy):
                     layers carrying more output energy keep more neurons.
  "d2_r2_tiebreak"   D2's vote fractions, R2 (instead of mean energy) breaking their ties;
                     with d2_mode="energy", R2 breaks exact ties of the energy only.
  "r2_within_d2"     neurons bucketed into ``bins`` global D2 quantiles; R2 orders neurons within
                     a bucket ("R2 picks among neurons of similar D2").
  "weighted"         (1 − w)·global D2 rank + w·per-layer R2 rank, w = ``r2_weight``.
"""

from __future__ import annotations

import torch

from kcm_cuda.pruning.d2 import combine_with_tiebreak

MERGES = ("mean_rank", "energy_weighted", "d2_r2_tiebreak", "r2_within_d2", "weighted")
# Measured on all-MiniLM-L6-v2 / VADER (docs/RESULTS.md): the spec's
# mean_rank loses 1.9-2.7 points of accuracy to D2 alone at c = 0.6; d2_r2_tiebreak matches or
# beats D2 at every budget measured, so it is the default R2D2 merge.
DEFAULT_MERGE = "d2_r2_tiebreak"


def normalized_rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks in [0, 1] (1 = largest), ties get their average rank."""
    x = x.double().flatten()
    n = x.numel()
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    sorted_x, order = torch.sort(x, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(
        sorted_x, return_inverse=True, return_counts=True
    )
    if uniq.numel() < n:
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
            0, inverse, torch.arange(n, dtype=torch.float64)
        )
        avg = sums / counts.double()
        ranks[order] = avg[inverse]
    return ranks / (n - 1)


def global_rank(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Normalised ranks computed over all layers together, split back per layer."""
    sizes = [s.numel() for s in scores]
    return list(torch.split(normalized_rank(torch.cat(scores)), sizes))


def merge_scores(
    r2: list[torch.Tensor],
    d2: list[torch.Tensor],
    d2_energy: list[torch.Tensor],
    *,
    d2_votes: list[torch.Tensor] | None = None,
    vote_step: float = 1.0,
    merge: str = "mean_rank",
    r2_weight: float = 0.25,
    bins: int = 20,
) -> list[torch.Tensor]:
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    r2_rank = [normalized_rank(s) for s in r2]
    if merge in ("mean_rank", "energy_weighted"):
        borda = [(a + normalized_rank(b)) / 2 for a, b in zip(r2_rank, d2, strict=True)]
        if merge == "mean_rank":
            return borda
        layer_e = torch.stack([e.sum() for e in d2_energy])
        w = layer_e / layer_e.mean() if float(layer_e.mean()) > 0 else torch.ones_like(layer_e)
        return [b * float(wi) for b, wi in zip(borda, w, strict=True)]
    g = global_rank(d2)
    if merge == "d2_r2_tiebreak":
        if d2_votes is not None:  # vote fractions (steps of 1/n_batches), R2 breaks their ties
            return combine_with_tiebreak(d2_votes, r2_rank, vote_step)
        n_total = sum(s.numel() for s in d2)
        # distinct (tie-averaged) global ranks are >= 1/(n_total-1) apart
        return combine_with_tiebreak(g, r2_rank, 1.0 / max(n_total - 1, 1))
    if merge == "r2_within_d2":
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"merge_bins must be an int >= 1, got {bins!r}")
        return [
            torch.floor(x * bins).clamp_max(bins - 1) + 0.999 * r
            for x, r in zip(g, r2_rank, strict=True)
        ]
    # weighted
    if not 0.0 <= float(r2_weight) <= 1.0:
        raise ValueError(f"r2_weight must be in [0, 1], got {r2_weight!r}")
    w = float(r2_weight)
    return [(1 - w) * x + w * r for x, r in zip(g, r2_rank, strict=True)]
