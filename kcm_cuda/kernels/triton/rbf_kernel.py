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

y is None (symmetric case): a persistent launch (about CTAS_PER_SM programs per SM) walks the
list of the nt (nt + 1) / 2 upper-triangular tiles (i <= j, column order so that consecutive
tiles share the column block of x); no program exists for the lower triangle and the tail is at
most one tile per program. Each tile stores its entries with row <= column and mirrors those
with row < column to (column, row), and writes exactly 1.0 on the diagonal. Every entry of the
upper triangle is computed exactly once and mirrored bit for bit: the result is exactly
symmetric with an exact unit diagonal, whatever the product's rounding.

NaN: the clamp max(d2, 0) propagates NaN, so a NaN point gives NaN in its row and column
(diagonal included), never a silent K = 1. (The public op rejects NaN input before that.)

Launches run under a device guard (the tensors' CUDA device made current), so tensors on
cuda:1 work whatever the current device is.

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

from kcm_cuda.kernels.triton._common import device_guard, is_interpreted, sm_count

__all__ = ["rbf_kernel", "row_sqnorms"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Fixed configuration used under the interpreter (and whenever a caller passes ``config``).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _general_configs() -> list[triton.Config]:
    """Autotune candidates of the general (x, y) kernel on a GPU."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 256, 32, 8, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, w, s in shapes
    ]


def _symmetric_configs() -> list[triton.Config]:
    """Autotune candidates of the persistent symmetric kernel (square tiles; CTAS_PER_SM is
    the resident programs per SM the persistent grid assumes)."""
    shapes = [  # (BLOCK, BLOCK_K, num_warps, num_stages, CTAS_PER_SM)
        (128, 32, 8, 3, 1),
        (128, 64, 8, 3, 1),
        (128, 32, 4, 3, 2),
        (64, 32, 4, 4, 2),
        (64, 64, 4, 3, 2),
        (64, 32, 4, 4, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_M": b, "BLOCK_K": bk, "CTAS_PER_SM": c}, num_warps=w, num_stages=s
        )
        for b, bk, w, s, c in shapes
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
    with device_guard(x.device):
        return _row_sqnorms(x)


def _row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    block_r = 32
    block_d = min(128, triton.next_power_of_2(d))
    _row_sqnorm_kernel[(triton.cdiv(n, block_r),)](
        x, out, n, d, x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


@triton.jit
def _rbf_tile(
    x_ptr,
    y_ptr,
    xsq_ptr,
    ysq_ptr,
    M,
    N,
    D,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    neg_scale,
    pid_m,
    pid_n,
    NATIVE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) RBF tile at tile coordinates (pid_m, pid_n)."""
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

    # Fused epilogue: squared distance, clamp at 0 (NaN propagates: a NaN point gives NaN,
    # never a silent K = 1), exp2 with the prescaled constant.
    xsq = tl.load(xsq_ptr + offs_m, mask=mask_m, other=0.0)
    ysq = tl.load(ysq_ptr + offs_n, mask=mask_n, other=0.0)
    d2 = xsq[:, None] + ysq[None, :] - 2.0 * acc
    d2 = tl.maximum(d2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.exp2(d2 * neg_scale)


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
    NATIVE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """General K(x, y): one program per tile, grouped ("super-tile") order for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    k = _rbf_tile(
        x_ptr, y_ptr, xsq_ptr, ysq_ptr, M, N, D, stride_xm, stride_xk, stride_ym, stride_yk,
        neg_scale, pid_m, pid_n, NATIVE_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    in_bounds = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + rows * stride_om + cols * stride_on, k, mask=in_bounds)


@triton.jit
def triangular_tile(t):
    """Tile t of the upper-triangular tile list in column order, t = j (j + 1) / 2 + i with
    i <= j, as (i, j). The float square root guess is corrected by one step each way."""
    t = tl.cast(t, tl.int32)  # a Python int under the interpreter
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    return t - j * (j + 1) // 2, j


@triton.jit
def _rbf_symmetric_persistent_kernel(
    x_ptr,
    xsq_ptr,
    out_ptr,
    M,
    D,
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    neg_scale,
    NATIVE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CTAS_PER_SM: tl.constexpr,  # only read by the launcher's grid (persistent grid size)
):
    """K(x, x): a persistent grid walks the T = nt (nt + 1) / 2 tiles (i <= j) of the upper
    triangle, tile t = pid, pid + programs, ...; no program is launched for the lower
    triangle. Each tile stores its entries with row <= column and mirrors those with
    row < column to (column, row), and writes 1.0 on the diagonal (NaN for a NaN point):
    every upper entry is computed once and mirrored bit for bit, so K is exactly symmetric
    with an exact unit diagonal, whatever the product's rounding."""
    nt = tl.cdiv(M, BLOCK_M)
    n_tiles = nt * (nt + 1) // 2
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        pid_m, pid_n = triangular_tile(t)
        k = _rbf_tile(
            x_ptr, x_ptr, xsq_ptr, xsq_ptr, M, M, D, stride_xm, stride_xk, stride_xm,
            stride_xk, neg_scale, pid_m, pid_n, NATIVE_DOT, INPUT_PRECISION, BLOCK_M,
            BLOCK_M, BLOCK_K,
        )  # fmt: skip
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        cols = offs_n.to(tl.int64)[None, :]
        in_bounds = (offs_m < M)[:, None] & (offs_n < M)[None, :]
        xsq_r = tl.load(xsq_ptr + offs_m, mask=offs_m < M, other=0.0)
        diag = tl.where(xsq_r != xsq_r, float("nan"), 1.0)  # NaN point: NaN, else exactly 1
        k = tl.where(rows == cols, diag[:, None], k)
        tl.store(out_ptr + rows * stride_om + cols * stride_on, k, mask=in_bounds & (rows <= cols))
        tl.store(out_ptr + cols * stride_om + rows * stride_on, k, mask=in_bounds & (rows < cols))


INTERPRETED = is_interpreted(_rbf_kernel)

_KEY = ["M", "D", "INPUT_PRECISION", "NATIVE_DOT"]
_rbf_symmetric_tuned = triton.autotune(configs=_symmetric_configs(), key=_KEY)(
    _rbf_symmetric_persistent_kernel
)
_rbf_general_tuned = triton.autotune(configs=_general_configs(), key=_KEY + ["N"])(_rbf_kernel)


def symmetric_grid_size(n: int, block: int, ctas_per_sm: int, device: torch.device) -> int:
    """Programs of the persistent symmetric launch: the upper-triangular tile count, capped
    at ``ctas_per_sm`` resident programs per SM."""
    nt = triton.cdiv(n, block)
    return max(1, min(nt * (nt + 1) // 2, ctas_per_sm * sm_count(device)))


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
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M (and optionally num_warps, num_stages; for y=None
    BLOCK_N must equal BLOCK_M, GROUP_M is unused and CTAS_PER_SM sets the persistent grid,
    default 2); by default a GPU autotunes and the interpreter uses :data:`INTERPRET_CONFIG`.
    """
    with device_guard(x.device):
        return _launch(x, y, sigma, precision, config)


def _launch(x, y, sigma, precision, config):
    symmetric = y is None
    yy = x if symmetric else y
    n, d = x.shape
    m = yy.shape[0]
    out = torch.empty((n, m), device=x.device, dtype=torch.float32)

    xsq = row_sqnorms(x)
    ysq = xsq if symmetric else row_sqnorms(yy)

    native = x.dtype == yy.dtype and x.dtype in _HALF_DTYPES and not INTERPRETED
    neg_scale = -math.log2(math.e) / (2.0 * float(sigma) * float(sigma))
    flags = {"NATIVE_DOT": native, "INPUT_PRECISION": precision}
    if config is None and INTERPRETED:
        config = INTERPRET_CONFIG

    if symmetric:
        args = (x, xsq, out, n, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1))

        def sym_grid(meta):
            return (symmetric_grid_size(n, meta["BLOCK_M"], meta["CTAS_PER_SM"], x.device),)

        if config is None:
            _rbf_symmetric_tuned[sym_grid](*args, neg_scale, **flags)
            return out
        if config["BLOCK_M"] != config.get("BLOCK_N", config["BLOCK_M"]):
            raise ValueError("the symmetric RBF kernel (y=None) needs BLOCK_M == BLOCK_N")
        cfg = {k: v for k, v in config.items() if k not in ("BLOCK_N", "GROUP_M")}
        cfg.setdefault("CTAS_PER_SM", 2)
        _rbf_symmetric_persistent_kernel[sym_grid](*args, neg_scale, **flags, **cfg)
        return out

    args = (
        x, yy, xsq, ysq, out, n, m, d,
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), out.stride(0), out.stride(1),
        neg_scale,
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    if config is not None:
        _rbf_kernel[grid](*args, **flags, **config)
    else:
        _rbf_general_tuned[grid](*args, **flags)
    return out
