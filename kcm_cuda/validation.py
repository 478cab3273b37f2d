"""Argument checks shared by every public op.

Each check raises a ``TypeError`` (wrong kind of object or dtype) or a ``ValueError``
(wrong value or shape) whose message names the offending argument, so that bad input never
surfaces as a stack trace from deep inside a kernel.
"""

from __future__ import annotations

import math

import torch

PRECISIONS = ("ieee", "tf32x3", "tf32")
FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_precision(precision: object) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_points(name: str, x: object) -> torch.Tensor:
    """A (rows, features) float matrix with at least one row and one feature, all finite."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    check_finite(name, x)
    return x


def check_sigma(sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        if isinstance(sigma, torch.Tensor) and sigma.numel() == 1:
            sigma = float(sigma)
        else:
            raise TypeError(f"sigma must be a positive number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return sigma


def check_rbf_args(x: object, y: object, sigma: object, precision: object):
    x = check_points("x", x)
    if y is not None:
        y = check_points("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"x and y must have the same number of features (d), got x: {tuple(x.shape)} "
                f"and y: {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    return x, y, check_sigma(sigma), check_precision(precision)


def check_square_stack(name: str, t: object) -> torch.Tensor:
    """A float (n, n) matrix or (L, n, n) stack of them with n >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be (n, n) or a stack (L, n, n), got shape {tuple(t.shape)}")
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    check_finite(name, t)
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative (a kernel matrix / convex coefficients)")
    return t


def check_kernel_matrix(K: object) -> torch.Tensor:
    return check_square_stack("K", K)


def check_update_args(K: object, C: object, precision: object):
    K = check_kernel_matrix(K)
    C = check_square_stack("C", C)
    if C.shape != K.shape:
        raise ValueError(f"C must have the shape of K {tuple(K.shape)}, got {tuple(C.shape)}")
    if C.device != K.device:
        raise ValueError(f"K and C must be on the same device, got {K.device} and {C.device}")
    return K, C, check_precision(precision)


def check_solver_args(alpha: object, max_iter: object) -> tuple[float, int]:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"max_iter must be an int, got {type(max_iter).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    return float(alpha), max_iter
