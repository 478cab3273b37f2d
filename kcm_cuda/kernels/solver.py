"""The KCM solver loop: repeat the convex update from C0 = 1/n until delta/mass < alpha.

Runs on any backend's ``convex_update`` over a stack (L, n, n): one launch per iteration for
all layers still running. A layer stops after the update that meets its criterion and is
frozen from then on, so the stacked solve equals solving each layer alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

UpdateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def solve_stack(
    K: torch.Tensor, update: UpdateFn, alpha: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K: float32 contiguous (L, n, n). Returns C (L, n, n) and n_iter LongTensor (L,)."""
    n_layers, n = K.shape[0], K.shape[-1]
    C = torch.full_like(K, 1.0 / n)
    n_iter = torch.zeros(n_layers, dtype=torch.long)
    active = torch.arange(n_layers)
    for step in range(1, max_iter + 1):
        all_active = active.numel() == n_layers
        K_active = K if all_active else K[active].contiguous()
        C_active = C if all_active else C[active].contiguous()
        C_new, delta, mass = update(K_active, C_active)
        if all_active:
            C = C_new
        else:
            C[active.to(C.device)] = C_new
        n_iter[active] = step
        delta64, mass64 = delta.double().cpu(), mass.double().cpu()
        converged = (delta64 == 0) | (delta64 < alpha * mass64)
        active = active[~converged]
        if active.numel() == 0:
            break
    return C, n_iter
