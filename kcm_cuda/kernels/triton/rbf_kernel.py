"""Triton Gaussian RBF kernel matrix: K_ij = exp(-max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) / (2 s^2)).

One launch computes the tiled product x @ y^T (``tl.dot``, float32 accumulator) and applies the
RBF in the epilogue, so the (n, m) distance matrix is never materialised:

    d2  = sqnorm_x[i] + sqnorm_y[j] - 2 * dot          (float32)
    K   = exp2(-max(d2, 0) * log2(e) / (2 sigma^2))    (one prescaled constant, exp2)

The squared row norms are computed in float32 beforehand by a small Triton kernel that reads
the inputs with their own strides (no float32 copy of x is made).

Inputs: float32 / float16 / bfloat16, any strides (strides are kernel arguments; no
``.contiguous()`` copy). float32 inputs are multiplied with the requested ``input_precision``
("ieee", "tf32x3", "tf32"). float16 / bfloat16 inputs (x and y of the same dtype) use the native
half-precision tensor-core product with a float32 accumulator: a product of two 11-bit (fp16) or
8-bit (bf16) mantissas is exact in float32, so every precision mode is as exact as "ieee" there.

y is None (symmetric case): only tiles with pid_m <= pid_n are computed (the others exit at
once). Each such program stores its tile for the entries with row <= column and the transposed
tile (at (j, i)) for row < column, and writes exactly 1.0 on the diagonal. Every entry of the
upper triangle is therefore computed exactly once and mirrored bit for bit: the result is
exactly symmetric with an exact unit diagonal, whatever the product's rounding.

Triton interpreter (TRITON_INTERPRET=1, CPU): a fixed small configuration is used instead of
autotuning. The interpreter's ``tl.dot`` is a NumPy float32 matmul that ignores
``input_precision`` (so "tf32" / "tf32x3" behave like "ieee" there), and its native bfloat16
dot multiplies the raw uint16 bit patterns (wrong results, triton 3.9.0): under the interpreter
half inputs are therefore upcast to float32 before the product (exact, see above).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["rbf_kernel", "row_sqnorms"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Fixed configuration used under the interpreter (and whenever a caller passes ``config``).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _gpu_configs(square: bool) -> list[triton.Config]:
    """Autotune candidates on a GPU. The symmetric kernel needs BLOCK_M == BLOCK_N."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
    ]
    if not square:
        shapes += [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 256, 32, 8, 3)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, w, s in shapes
    ]


@triton.jit
def _row_sqnorm_kernel(
    x_ptr,
    out_ptr,
    M,
    D,
    stride_xm,
    stride_xk,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[i] = sum_k float32(x[i, k])^2 for a block of rows, any strides."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    row_off = rows.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        ptrs = x_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_xk
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += v * v
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)


def row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """float32 squared Euclidean norms of the rows of a 2-D tensor (any float dtype/strides)."""
    n, d = x.shape
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    block_r = 32
    block_d = min(128, triton.next_power_of_2(d))
    _row_sqnorm_kernel[(triton.cdiv(n, block_r),)](
        x, out, n, d, x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


@triton.jit
def _rbf_kernel(
    x_ptr,
    y_ptr,
    xsq_ptr,
    ysq_ptr,
    out_ptr,
    M,
    N,
    D,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    stride_om,
    stride_on,
    neg_scale,  # -log2(e) / (2 sigma^2), float32
    SYMMETRIC: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ("super-tile") ordering of the programs for L2 reuse.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    if SYMMETRIC:
        tl.static_assert(BLOCK_M == BLOCK_N, "the symmetric RBF kernel needs square tiles")
        if pid_m > pid_n:
            return  # the mirror tile (pid_n, pid_m) writes this one

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # int64 offsets: n * stride may exceed 2^31 for large (e.g. activation) matrices.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    y_ptrs = y_ptr + offs_n.to(tl.int64)[None, :] * stride_ym + offs_k[:, None] * stride_yk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_in = (k0 + offs_k) < D
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_in[None, :], other=0.0)
        b = tl.load(y_ptrs, mask=k_in[:, None] & mask_n[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk

    # Fused epilogue: squared distance, clamp at 0, exp2 with the prescaled constant.
    xsq = tl.load(xsq_ptr + offs_m, mask=mask_m, other=0.0)
    ysq = tl.load(ysq_ptr + offs_n, mask=mask_n, other=0.0)
    d2 = xsq[:, None] + ysq[None, :] - 2.0 * acc
    d2 = tl.maximum(d2, 0.0)
    k = tl.exp2(d2 * neg_scale)

    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    in_bounds = mask_m[:, None] & mask_n[None, :]
    if SYMMETRIC:
        k = tl.where(rows == cols, 1.0, k)
        tl.store(out_ptr + rows * stride_om + cols * stride_on, k, mask=in_bounds & (rows <= cols))
        # Mirror: entry (i, j), i < j, also goes to (j, i).
        tl.store(out_ptr + cols * stride_om + rows * stride_on, k, mask=in_bounds & (rows < cols))
    else:
        tl.store(out_ptr + rows * stride_om + cols * stride_on, k, mask=in_bounds)


def _is_interpreted(fn: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton layouts
        return False
    return isinstance(fn, InterpretedFunction)


INTERPRETED = _is_interpreted(_rbf_kernel)

_KEY = ["M", "N", "D", "INPUT_PRECISION", "NATIVE_DOT"]
_rbf_symmetric_tuned = triton.autotune(configs=_gpu_configs(square=True), key=_KEY)(_rbf_kernel)
_rbf_general_tuned = triton.autotune(configs=_gpu_configs(square=False), key=_KEY)(_rbf_kernel)


def rbf_kernel(
    x: torch.Tensor,
    y: torch.Tensor | None,
    sigma: float,
    precision: str,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Backend op (inputs already validated). Returns the float32 (n, m) kernel matrix.

    ``config`` (tests/benchmarks only) forces a fixed tile configuration, a dict with
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M (and optionally num_warps, num_stages); by default a
    GPU autotunes and the interpreter uses :data:`INTERPRET_CONFIG`.
    """
    symmetric = y is None
    yy = x if symmetric else y
    n, d = x.shape
    m = yy.shape[0]
    out = torch.empty((n, m), device=x.device, dtype=torch.float32)

    xsq = row_sqnorms(x)
    ysq = xsq if symmetric else row_sqnorms(yy)

    native = x.dtype == yy.dtype and x.dtype in _HALF_DTYPES and not INTERPRETED
    neg_scale = -math.log2(math.e) / (2.0 * float(sigma) * float(sigma))
    args = (
        x, yy, xsq, ysq, out, n, m, d,
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), out.stride(0), out.stride(1),
        neg_scale,
    )  # fmt: skip
    flags = {"SYMMETRIC": symmetric, "NATIVE_DOT": native, "INPUT_PRECISION": precision}

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    if config is None and INTERPRETED:
        config = INTERPRET_CONFIG
    if config is not None:
        if symmetric and config["BLOCK_M"] != config["BLOCK_N"]:
            raise ValueError("the symmetric RBF kernel (y=None) needs BLOCK_M == BLOCK_N")
        _rbf_kernel[grid](*args, **flags, **config)
    elif symmetric:
        _rbf_symmetric_tuned[grid](*args, **flags)
    else:
        _rbf_general_tuned[grid](*args, **flags)
    return out
