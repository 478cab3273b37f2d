"""The KCM solver loop: repeat the convex update from C0 = 1/n until delta/mass < alpha.

Runs on any backend's ``convex_update`` over a stack (L, n, n): one launch per iteration for
all layers still running. A layer stops after the update that meets its criterion and is
frozen from then on, so the stacked solve equals solving each layer alone.

Working set: the running layers' K and C are gathered into contiguous stacks only when the
set of running layers changes (at most L - 1 times per solve), never once per iteration.

Transposed iteration: when the backend offers ``convex_update_transposed`` (Triton) and K is
exactly symmetric (checked once; a kernel matrix from ``rbf_kernel`` always is), the loop
iterates on D = C^T with D <- D * sqrt(K / (D K)), which is C's update transposed (K^T = K),
so both operands of the product are read along k; C = D^T is formed once at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

UpdateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def is_exactly_symmetric(K: torch.Tensor) -> bool:
    """Whether every matrix of the stack equals its transpose bit for bit (one pass)."""
    return bool(torch.equal(K, K.mT))


def solve_stack(
    K: torch.Tensor,
    update: UpdateFn,
    alpha: float,
    max_iter: int,
    *,
    update_transposed: UpdateFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K: float32 contiguous (L, n, n). Returns C (L, n, n) and n_iter LongTensor (L,).

    ``update_transposed`` (optional): the update on D = C^T for a symmetric K; used when K is
    exactly symmetric, else ``update`` is.
    """
    n_layers, n = K.shape[0], K.shape[-1]
    transposed = update_transposed is not None and is_exactly_symmetric(K)
    step_fn = update_transposed if transposed else update
    # X is C, or D = C^T when transposed (the same constant start).
    X = torch.full_like(K, 1.0 / n)
    n_iter = torch.zeros(n_layers, dtype=torch.long)
    active = torch.arange(n_layers)
    K_work, X_work = K, X
    for step in range(1, max_iter + 1):
        X_work, delta, mass = step_fn(K_work, X_work)
        n_iter[active] = step
        sums = torch.stack((delta, mass)).double().cpu()  # one host sync per iteration
        delta64, mass64 = sums[0], sums[1]
        converged = (delta64 == 0) | (delta64 < alpha * mass64)
        if not bool(converged.any()):
            continue
        # The running set shrinks: store its state, then gather the layers still running.
        X = _store(X, active, X_work, n_layers)
        active = active[~converged]
        if active.numel() == 0:
            break
        index = active.to(K.device)
        K_work, X_work = K[index].contiguous(), X[index].contiguous()
    else:
        X = _store(X, active, X_work, n_layers)
    C = X.mT.contiguous() if transposed else X
    return C, n_iter


def _store(X: torch.Tensor, active: torch.Tensor, X_work: torch.Tensor, n_layers: int):
    if active.numel() == n_layers:
        return X_work
    X[active.to(X.device)] = X_work
    return X
