"""The two KCM kernels and the solver, one function each, backend chosen automatically.

    rbf_kernel(x, y=None, sigma=1.0)   Gaussian RBF kernel matrix (float32)
    convex_update(K, C)                one multiplicative convex-coefficient step
    kcm_coefficients(K)                the solver loop (one matrix or a stack of layers)

Every function validates its arguments (clear ``TypeError``/``ValueError`` naming the
argument), picks a backend with :func:`kcm_cuda.dispatch.resolve_backend` and calls that
backend's module.
"""

from __future__ import annotations

import torch

from kcm_cuda import validation
from kcm_cuda.dispatch import available_backends, backend_module, resolve_backend
from kcm_cuda.kernels.solver import solve_stack

__all__ = [
    "available_backends",
    "convex_update",
    "default_precision",
    "kcm_coefficients",
    "rbf_kernel",
]


def default_precision(device: torch.device | str) -> str:
    """The precision ``precision="auto"`` resolves to for tensors on ``device``: "tf32" on
    CUDA GPUs with TF32 tensor cores (compute capability 8.0+), "ieee" elsewhere (the CPU,
    V100/T4). The R2 ranking under TF32 was measured against ieee on real MiniLM weights (TF32
    emulated on the CPU): benchmarks/results/cpu-amd-epyc/r2_precision/."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32"
    return "ieee"


def _resolve_precision(precision: object, device: torch.device) -> str:
    if precision == "auto":
        return default_precision(device)
    return validation.check_precision(precision)


def rbf_kernel(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    sigma: float = 1.0,
    *,
    precision: str = "ieee",
    backend: str = "auto",
) -> torch.Tensor:
    """Gaussian RBF kernel matrix K_ij = exp(-||x_i - y_j||^2 / (2 sigma^2)).

    x: (n, d), y: (m, d) or None (then y = x, K is exactly symmetric with diagonal 1).
    Inputs float32/float16/bfloat16 with any strides; the product accumulates in float32.
    float64 inputs: "auto" runs them on the torch backend, entirely in float64 (precision
    ignored), rounded to float32 only at the end; an explicit GPU backend ("cuda",
    "triton") casts them to float32 first and then ``precision`` applies.
    precision: "ieee" (exact float32), "tf32x3" (three TF32 products, close to float32),
    "tf32" (one TF32 product, ~1e-3 relative error in the dot products), "auto"
    (:func:`default_precision` of the device). Returns float32 (n, m).
    NaN / Inf points raise ValueError (the kernels themselves propagate NaN).
    """
    if precision == "auto" and isinstance(x, torch.Tensor):
        precision = default_precision(x.device)
    x, y, sigma, precision = validation.check_rbf_args(x, y, sigma, precision)
    f64 = x.dtype == torch.float64 or (y is not None and y.dtype == torch.float64)
    name = resolve_backend(
        backend, x.device, "rbf", precision, torch.float64 if f64 else x.dtype
    )
    if f64 and name not in ("torch", "reference"):
        x = x.float()
        y = None if y is None else y.float()
    return backend_module(name).rbf_kernel(x, y, sigma, precision)


def _as_stack(t: torch.Tensor) -> torch.Tensor:
    stack = t if t.dim() == 3 else t.unsqueeze(0)
    return stack.to(torch.float32).contiguous()


def convex_update(
    K: torch.Tensor,
    C: torch.Tensor,
    *,
    precision: str = "ieee",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step C_new = C * sqrt(K / (K C)) (0 where K C = 0), with delta = sum|C_new - C|
    and mass = sum|C| computed in the same pass.

    K, C: (n, n) or a stack (L, n, n), non-negative. Returns C_new (float32, K's shape) and
    delta, mass as 0-d tensors, or (L,) tensors for a stack.
    """
    if precision == "auto" and isinstance(K, torch.Tensor):
        precision = default_precision(K.device)
    K, C, precision = validation.check_update_args(K, C, precision)
    name = resolve_backend(backend, K.device, "convex_update", precision)
    C_new, delta, mass = backend_module(name).convex_update(_as_stack(K), _as_stack(C), precision)
    if K.dim() == 2:
        return C_new[0], delta[0], mass[0]
    return C_new, delta, mass


def kcm_coefficients(
    K: torch.Tensor,
    *,
    alpha: float = 0.01,
    max_iter: int = 100,
    precision: str = "ieee",
    backend: str = "auto",
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Non-negative coefficients C minimising ||Phi - Phi C||^2 in the RKHS of K.

    From C0 = 1/n, repeats :func:`convex_update` until delta/mass < alpha or ``max_iter``
    updates. K: (n, n) → (C, n_iter: int); a stack (L, n, n) → (C, n_iter: LongTensor (L,)),
    all layers in one launch per iteration, each layer stopping on its own.
    """
    K = validation.check_kernel_matrix(K)
    alpha, max_iter = validation.check_solver_args(alpha, max_iter)
    precision = _resolve_precision(precision, K.device)
    name = resolve_backend(backend, K.device, "convex_update", precision)
    module = backend_module(name)
    transposed = getattr(module, "convex_update_transposed", None)
    C, n_iter = solve_stack(
        _as_stack(K),
        lambda k, c: module.convex_update(k, c, precision),
        alpha,
        max_iter,
        update_transposed=(
            None if transposed is None else (lambda k, d: transposed(k, d, precision))
        ),
    )
    if K.dim() == 2:
        return C[0], int(n_iter[0])
    return C, n_iter
