"""R2 — representative ranking from the weights alone (kernelized convex hull).

Per layer, the neurons are points p_i (default: W2[:, i], the neuron's output vector;
alternative ``points="input"``: [W1[i], b1[i]]). K = rbf_kernel(P, sigma); C solves the
kernelized convex-NMF problem (kcm_coefficients, all layers of equal width in one stacked
solve); S_R2(i) = C_ii (a neuron the others cannot express keeps its weight on itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kcm_cuda.kernels import kcm_coefficients, rbf_kernel
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.progress import progress_bar

R2_POINTS = ("output", "input")


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
    sigma: float,
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
    stacked solve (chunked to fit ``max_bytes``)."""
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
                    point_sets[i].to(device), sigma=sigma, precision=precision, backend=backend
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
    sigma: float = 1.0,
    alpha: float = 0.01,
    max_iter: int = 100,
    precision: str = "ieee",
    backend: str = "auto",
    device: torch.device,
    max_bytes: int | None = None,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[int]]:
    """S_R2 per layer (float64 (n_l,), higher = more representative) and solver iterations."""
    sets = [neuron_points(adapter, b, points) for b in adapter.layers(model)]
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
