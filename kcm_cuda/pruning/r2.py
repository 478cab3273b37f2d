"""R2 — representative ranking from the weights alone (kernelized convex hull).

Per layer, the neurons are points p_i (default: W2[:, i], the neuron's output vector;
alternative ``points="input"``: [W1[i], b1[i]]). K = rbf_kernel(P, sigma); C solves the
kernelized convex-NMF problem (kcm_coefficients, all layers of equal width in one stacked
solve); S_R2(i) = C_ii (a neuron the others cannot express keeps its weight on itself).

``sigma``: a positive number, or "median": per layer, the median pairwise distance of its
points (the usual data-driven bandwidth; see :func:`median_sigma`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kcm_cuda.kernels import kcm_coefficients, rbf_kernel
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.progress import progress_bar

R2_POINTS = ("output", "input")
SIGMA_RULES = ("median",)


def median_sigma(points: torch.Tensor, max_points: int = 2048) -> float:
    """The median Euclidean distance between distinct points (rows); at most ``max_points``
    rows are used (evenly spaced, deterministic). Raises if it is 0 or not finite (all points
    equal): no bandwidth can be read from such data."""
    if points.dim() != 2 or points.shape[0] < 2:
        raise ValueError(f"sigma='median' needs at least 2 points, got {tuple(points.shape)}")
    x = points.detach().double().cpu()
    if x.shape[0] > max_points:
        x = x[torch.linspace(0, x.shape[0] - 1, max_points).round().long()]
    d = torch.cdist(x, x)
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    med = float(d[iu[0], iu[1]].median())
    if not math.isfinite(med) or med <= 0:
        raise ValueError(
            f"sigma='median': the median pairwise distance of the points is {med}; pass a "
            "positive number as sigma"
        )
    return med


def resolve_sigmas(point_sets: Sequence[torch.Tensor], sigma: float | str) -> list[float]:
    """One bandwidth per point set: ``sigma`` itself, or the median rule."""
    if isinstance(sigma, str):
        if sigma not in SIGMA_RULES:
            raise ValueError(
                f"sigma must be a positive number or one of {SIGMA_RULES}, got {sigma!r}"
            )
        return [median_sigma(p) for p in point_sets]
    return [float(sigma)] * len(point_sets)


def neuron_points(adapter: FFNAdapter, block: nn.Module, points: str) -> torch.Tensor:
    """(n, d) float32 points, one row per neuron."""
    if points == "output":
        return adapter.w2(block).weight.detach().t().float()
    if points == "input":
        w1 = adapter.w1(block)
        W = w1.weight.detach().float()
        b = w1.bias.detach().float() if w1.bias is not None else torch.zeros(W.shape[0])
        return torch.cat([W, b.to(W.device).unsqueeze(1)], dim=1)
    raise ValueError(f"r2_points must be one of {R2_POINTS}, got {points!r}")


def _chunk_layers(n: int, device: torch.device, max_bytes: int | None) -> int:
    """How many n×n layers to solve in one stack (K, C and ~3 temporaries of n² float32)."""
    per_layer = 5 * n * n * 4
    if max_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_bytes = int(free * 0.6)
        else:
            max_bytes = 2 << 30
    return max(1, max_bytes // per_layer)


def diag_coefficients(
    point_sets: Sequence[torch.Tensor],
    *,
    sigma: float | str | Sequence[float],
    alpha: float,
    max_iter: int,
    precision: str,
    backend: str,
    device: torch.device,
    max_bytes: int | None = None,
    progress: bool = False,
    desc: str = "R2",
) -> tuple[list[torch.Tensor], list[int]]:
    """diag(C) and solver iterations for each point set; sets of equal size share one
    stacked solve (chunked to fit ``max_bytes``). ``sigma``: one bandwidth for all sets, one
    per set, or "median" (see :func:`resolve_sigmas`)."""
    if isinstance(sigma, (str, int, float)):
        sigmas = resolve_sigmas(point_sets, sigma)
    else:
        sigmas = [float(x) for x in sigma]
        if len(sigmas) != len(point_sets):
            raise ValueError(f"{len(sigmas)} sigmas for {len(point_sets)} point sets")
    diags: list[torch.Tensor | None] = [None] * len(point_sets)
    iters: list[int] = [0] * len(point_sets)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(point_sets):
        groups.setdefault(int(p.shape[0]), []).append(i)
    chunks: list[list[int]] = []
    for n, members in groups.items():
        size = _chunk_layers(n, device, max_bytes)
        chunks += [members[j : j + size] for j in range(0, len(members), size)]
    bar = progress_bar(chunks, total=len(chunks), desc=desc, enabled=progress, unit="stack")
    for chunk in bar:
        K = torch.stack(
            [
                rbf_kernel(
                    point_sets[i].to(device), sigma=sigmas[i], precision=precision, backend=backend
                )
                for i in chunk
            ]
        )
        C, n_iter = kcm_coefficients(
            K, alpha=alpha, max_iter=max_iter, precision=precision, backend=backend
        )
        d = torch.diagonal(C, dim1=-2, dim2=-1).double().cpu()
        for j, i in enumerate(chunk):
            diags[i] = d[j]
            iters[i] = int(n_iter[j])
        del K, C
    return [d for d in diags if d is not None], iters


def r2_scores(
    model: nn.Module,
    adapter: FFNAdapter,
    *,
    points: str = "output",
    sigma: float | str = 1.0,
    alpha: float = 0.01,
    max_iter: int = 100,
    precision: str = "ieee",
    backend: str = "auto",
    device: torch.device,
    max_bytes: int | None = None,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[int]]:
    """S_R2 per layer (float64 (n_l,), higher = more representative) and solver iterations."""
    from kcm_cuda.pruning.blockwise import map_blocks

    sets = map_blocks(model, adapter, lambda b: neuron_points(adapter, b, points))
    return diag_coefficients(
        sets,
        sigma=sigma,
        alpha=alpha,
        max_iter=max_iter,
        precision=precision,
        backend=backend,
        device=device,
        max_bytes=max_bytes,
        progress=progress,
        desc="R2",
    )
