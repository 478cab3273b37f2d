"""Global top-k: the scores of all layers are merged and sorted, the best k neurons kept,
with at least ``min_keep`` per layer. Ties are broken deterministically (layer, then index)."""

from __future__ import annotations

import math

import torch


def width_quotas(k_total: int, sizes: list[int]) -> list[int]:
    """Each layer's width-proportional share of ``k_total`` neurons (rounded; D2's votes)."""
    return [round(k_total * n / sum(sizes)) for n in sizes]


def resolve_min_keep(min_keep: object, sizes: list[int]) -> list[int]:
    """``min_keep``: an int (neurons) or a float in [0, 1) (fraction of each layer)."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)):
        raise TypeError(f"min_keep must be an int or a fraction, got {type(min_keep).__name__}")
    if isinstance(min_keep, float):
        if not math.isfinite(min_keep) or not 0.0 <= min_keep < 1.0:
            raise ValueError(f"min_keep as a fraction must be in [0, 1), got {min_keep!r}")
        return [max(1, math.ceil(min_keep * n)) if min_keep > 0 else 0 for n in sizes]
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    return [min(int(min_keep), n) for n in sizes]


def global_topk(
    scores: list[torch.Tensor], k: int, min_keep: list[int] | None = None
) -> list[torch.Tensor]:
    """Boolean masks (one per layer) keeping exactly ``k`` neurons in total."""
    sizes = [int(s.numel()) for s in scores]
    min_keep = min_keep or [0] * len(sizes)
    if k > sum(sizes) or k < sum(min_keep):
        raise ValueError(f"cannot keep {k} neurons out of {sum(sizes)} with min_keep {min_keep}")
    masks = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    flat = torch.cat([s.detach().double().cpu().flatten() for s in scores])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("neuron scores contain NaN or Inf")
    # Stable descending sort: equal scores keep (layer, index) order.
    order = torch.sort(flat, descending=True, stable=True).indices
    taken = 0
    # 1) each layer's own best min_keep neurons
    for i, (s, m) in enumerate(zip(scores, min_keep, strict=True)):
        if m > 0:
            top = torch.sort(s.detach().double().cpu(), descending=True, stable=True).indices[:m]
            masks[i][top] = True
            taken += m
    # 2) fill the rest globally, best first, skipping neurons already kept
    already = torch.cat(masks)[order]
    fill = order[~already][: k - taken]
    flat_mask = torch.cat(masks)
    flat_mask[fill] = True
    masks = [m.clone() for m in torch.split(flat_mask, sizes)]
    return masks
