"""The truth: the two KCM kernels and the solver as plain float64 code on the CPU.

Written for clarity, not speed. Every backend is tested against these functions. They take
the same arguments as the public ops (no validation here) and return float64 CPU tensors.
"""

from __future__ import annotations

import torch


def rbf_kernel(x: torch.Tensor, y: torch.Tensor | None = None, sigma: float = 1.0) -> torch.Tensor:
    """K_ij = exp(-||x_i - y_j||^2 / (2 sigma^2)), by explicit differences (no expansion)."""
    x64 = x.detach().to("cpu", torch.float64)
    y64 = x64 if y is None else y.detach().to("cpu", torch.float64)
    diff = x64[:, None, :] - y64[None, :, :]
    sq_dist = (diff * diff).sum(-1)
    return torch.exp(-sq_dist / (2.0 * float(sigma) ** 2))


def convex_update(K: torch.Tensor, C: torch.Tensor):
    """One multiplicative step C <- C * sqrt(K / (K C)), with delta = sum|C_new - C| and
    mass = sum|C| (of the input C). Works on (n, n) or (L, n, n); where (K C) == 0 the new
    coefficient is 0 (then C was 0 there too whenever K has a positive diagonal)."""
    K64 = K.detach().to("cpu", torch.float64)
    C64 = C.detach().to("cpu", torch.float64)
    KC = K64 @ C64
    safe = torch.where(KC > 0, KC, torch.ones_like(KC))
    C_new = torch.where(KC > 0, C64 * torch.sqrt(K64 / safe), torch.zeros_like(C64))
    dims = (-2, -1)
    delta = (C_new - C64).abs().sum(dims)
    mass = C64.abs().sum(dims)
    return C_new, delta, mass


def kcm_coefficients(K: torch.Tensor, alpha: float = 0.01, max_iter: int = 100):
    """Solve min_{C >= 0} ||Phi - Phi C||^2 by the multiplicative rule, from C0 = 1/n.

    Stops after the update whose delta / mass < alpha (or delta == 0: a fixed point), or
    after max_iter updates. For a
    stack (L, n, n) each layer stops on its own. Returns (C, n_iter): n_iter an int for one
    matrix, a LongTensor (L,) for a stack."""
    K64 = K.detach().to("cpu", torch.float64)
    if K64.dim() == 3:
        results = [kcm_coefficients(k, alpha, max_iter) for k in K64]
        C = torch.stack([c for c, _ in results])
        return C, torch.tensor([it for _, it in results], dtype=torch.long)
    n = K64.shape[-1]
    C = torch.full_like(K64, 1.0 / n)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is the result)
        C, delta, mass = convex_update(K64, C)
        if float(delta) == 0.0 or float(delta) < alpha * float(mass):
            break
    return C, n_iter
