"""The ``torch`` backend: vectorised PyTorch on any device.

It is the fallback of the dispatch and the CPU implementation of the ``kcm::`` custom ops.
The precision modes are honoured on every device: on CUDA "tf32" lets cuBLAS use TF32
tensor cores; on the CPU the TF32 rounding of the inputs is emulated (10-bit mantissa, round
to nearest), so the error of each mode can be measured on any machine.
"""

from __future__ import annotations

import contextlib

import torch


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest TF32 value (8-bit exponent, 10-bit mantissa)."""
    bits = t.contiguous().view(torch.int32)
    # Round half away from zero on the 13 dropped mantissa bits, as the tensor cores' cvt.rna.
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32)


@contextlib.contextmanager
def _cuda_tf32(enabled: bool):
    """Pin cuBLAS's TF32 switch for the products inside, restoring the user's setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _tf32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        with _cuda_tf32(True):
            return torch.matmul(a, b)
    # Products of two 11-bit mantissas are exact in float32: an fp32 matmul of the rounded
    # inputs is what a TF32 tensor core computes (up to the order of accumulation).
    return torch.matmul(round_to_tf32(a), round_to_tf32(b))


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 a @ b (batched allowed) at the requested precision."""
    if precision == "tf32":
        return _tf32_product(a, b)
    if precision == "tf32x3":
        a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
        a_lo, b_lo = a - a_hi, b - b_hi
        return _tf32_product(a_hi, b_lo) + _tf32_product(a_lo, b_hi) + _tf32_product(a_hi, b_hi)
    if a.is_cuda:
        with _cuda_tf32(False):
            return torch.matmul(a, b)
    return torch.matmul(a, b)


def rbf_kernel(
    x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str
) -> torch.Tensor:
    """float32 K. float64 points (x or y) are computed entirely in float64 (``precision``
    does not apply: there is no TF32 for float64) and rounded to float32 at the end.
    A NaN point gives NaN in its row/column, diagonal included (no silent K = 1)."""
    f64 = x.dtype == torch.float64 or (y is not None and y.dtype == torch.float64)
    work = torch.float64 if f64 else torch.float32
    if f64:
        precision = "ieee"
    xf = x.to(work)
    x_sq = (xf * xf).sum(1)
    if y is None:
        # dot + dot^T is exactly symmetric (float addition commutes) even where BLAS is not.
        dot = matmul(xf, xf.t(), precision)
        two_dot = dot.add_(dot.t().clone())
        y_sq = x_sq
    else:
        yf = y.to(work)
        y_sq = (yf * yf).sum(1)
        two_dot = matmul(xf, yf.t(), precision).mul_(2.0)
    # |x_i|^2 + |y_j|^2 first: that sum is symmetric too, so K stays exactly symmetric.
    K = (x_sq[:, None] + y_sq[None, :]).sub_(two_dot).clamp_min_(0.0)
    del two_dot
    K = K.mul_(-0.5 / (sigma * sigma)).exp_().to(torch.float32)
    if y is None:
        # Exactly 1 (NaN for a NaN point: clamp_min_ above propagates NaN, so must this).
        K.diagonal().copy_(torch.where(x_sq.isnan(), torch.nan, 1.0))
    return K


def convex_update(K: torch.Tensor, C: torch.Tensor, precision: str):
    KC = matmul(K, C, precision)
    zero = KC <= 0
    C_new = torch.div(K, KC.masked_fill_(zero, 1.0)).sqrt_().mul_(C).masked_fill_(zero, 0.0)
    delta = (C_new - C).abs_().sum((-2, -1))
    mass = C.abs().sum((-2, -1))
    return C_new, delta, mass
