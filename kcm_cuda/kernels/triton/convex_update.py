"""Triton fused convex-coefficient update for a stack of layers (B, n, n).

One launch, grid (tiles of n x n, B): each program computes a tile of KC = K @ C for its
batch entry (``tl.dot``, float32 accumulator, ``input_precision`` from ``precision``) and, in
the epilogue, with the tile of K and C it loads once:

    C_new = where(KC > 0, C * sqrt(K / KC), 0)          (IEEE div_rn / sqrt_rn)
    partial[b, tile] = (sum |C_new - C|, sum |C|)       over the tile

The partial sums go to a small (B, tiles, 2) buffer and a final ``torch.sum`` over the tiles
gives delta (B,) and mass (B,). No float atomics and a fixed reduction order: the result is
deterministic run to run. The n x n matrices are read by the product and once more tile by
tile in the epilogue; nothing else passes over them.

On a GPU the tile configuration is autotuned (``reset_to_zero`` keeps the partials buffer
exact across the configs tried). Under TRITON_INTERPRET=1 a fixed small configuration is used;
there ``tl.dot`` is a NumPy float32 matmul that ignores ``input_precision``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kcm_cuda.kernels.triton._common import device_guard, is_interpreted

__all__ = ["convex_update", "convex_update_transposed"]

INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

_GPU_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 128, 16, 8, 4),
]
_GPU_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, bk, w, s in _GPU_SHAPES
]


@triton.jit
def _convex_update_kernel(
    k_ptr,
    c_ptr,
    out_ptr,
    part_ptr,
    N,
    stride_kb,
    stride_km,
    stride_kn,
    stride_cb,
    stride_cm,
    stride_cn,
    stride_ob,
    stride_om,
    stride_on,
    stride_pb,  # partials: (B, P, 2) contiguous, stride_pb = 2 * P
    TRANSPOSED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]

    k_base = k_ptr + batch * stride_kb
    c_base = c_ptr + batch * stride_cb
    if TRANSPOSED:
        # (D K)[m, n] = sum_k D[m, k] K[n, k] (K symmetric): both operands read along k.
        a_ptrs = c_base + rows * stride_cm + offs_k[None, :] * stride_cn
        b_ptrs = k_base + cols * stride_km + offs_k[:, None] * stride_kn
        a_step = BLOCK_K * stride_cn
        b_step = BLOCK_K * stride_kn
    else:
        # (K C)[m, n] = sum_k K[m, k] C[k, n].
        a_ptrs = k_base + rows * stride_km + offs_k[None, :] * stride_kn
        b_ptrs = c_base + offs_k[:, None] * stride_cm + cols * stride_cn
        a_step = BLOCK_K * stride_kn
        b_step = BLOCK_K * stride_cm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k_in = (k0 + offs_k) < N
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    # Fused epilogue. Out-of-range lanes load 0 for K and C and contribute 0 to the sums.
    # (TRANSPOSED: c is D and K[m, n] = K[n, m], so the same formula gives D_new.)
    in_bounds = mask_m[:, None] & mask_n[None, :]
    k_tile = tl.load(k_base + rows * stride_km + cols * stride_kn, mask=in_bounds, other=0.0)
    c_tile = tl.load(c_base + rows * stride_cm + cols * stride_cn, mask=in_bounds, other=0.0)
    positive = acc > 0.0
    safe_kc = tl.where(positive, acc, 1.0)
    c_new = tl.where(positive, c_tile * tl.sqrt_rn(tl.div_rn(k_tile, safe_kc)), 0.0)
    out_base = out_ptr + batch * stride_ob
    tl.store(out_base + rows * stride_om + cols * stride_on, c_new, mask=in_bounds)

    delta_part = tl.sum(tl.sum(tl.abs(c_new - c_tile), axis=1), axis=0)
    mass_part = tl.sum(tl.sum(tl.abs(c_tile), axis=1), axis=0)
    p = part_ptr + batch * stride_pb + pid * 2
    tl.store(p, delta_part)
    tl.store(p + 1, mass_part)


INTERPRETED = is_interpreted(_convex_update_kernel)

_convex_update_tuned = triton.autotune(
    configs=_GPU_CONFIGS, key=["N", "INPUT_PRECISION", "TRANSPOSED"], reset_to_zero=["part_ptr"]
)(_convex_update_kernel)


def convex_update(
    K: torch.Tensor,
    C: torch.Tensor,
    precision: str,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend op. K, C: float32 (B, n, n), same device (validated by the public layer).

    Returns C_new (B, n, n) float32 contiguous, delta (B,) and mass (B,) float32.
    ``config`` (tests/benchmarks only) forces a fixed tile configuration (BLOCK_M, BLOCK_N,
    BLOCK_K, GROUP_M); by default a GPU autotunes and the interpreter uses
    :data:`INTERPRET_CONFIG`.
    """
    with device_guard(K.device):
        return _launch(K, C, precision, config, transposed=False)


def convex_update_transposed(
    K: torch.Tensor,
    D: torch.Tensor,
    precision: str,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step on D = C^T for an exactly symmetric K: D_new = D * sqrt(K / (D K)).

    Transposing C_new = C * sqrt(K / (K C)) gives C_new^T = C^T * sqrt(K^T / (C^T K^T)), and
    K^T = K, so D_new = C_new^T exactly (only the float summation order of the product may
    differ); delta and mass are sums over all entries, unchanged by the transpose. Both
    operands of D K are read along k (row i of D, row j of K), where K C reads C across its
    columns. The caller guarantees K is symmetric (the solver checks it once).
    Returns D_new (B, n, n), delta (B,), mass (B,).
    """
    with device_guard(K.device):
        return _launch(K, D, precision, config, transposed=True)


def _launch(K, C, precision, config, *, transposed):
    batch, n, _ = K.shape
    out = torch.empty((batch, n, n), device=K.device, dtype=torch.float32)
    if config is None and INTERPRETED:
        config = INTERPRET_CONFIG
    # The partials buffer has a slot per program of the config with the most tiles; the
    # slots a config does not use stay 0.
    shapes = (
        [(config["BLOCK_M"], config["BLOCK_N"])]
        if config is not None
        else [(bm, bn) for bm, bn, _, _, _ in _GPU_SHAPES]
    )
    n_tiles = max(triton.cdiv(n, bm) * triton.cdiv(n, bn) for bm, bn in shapes)
    partials = torch.zeros((batch, n_tiles, 2), device=K.device, dtype=torch.float32)
    args = (
        K, C, out, partials, n,
        K.stride(0), K.stride(1), K.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        partials.stride(0),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)

    if config is not None:
        _convex_update_kernel[grid](
            *args, TRANSPOSED=transposed, INPUT_PRECISION=precision, **config
        )
    else:
        _convex_update_tuned[grid](*args, TRANSPOSED=transposed, INPUT_PRECISION=precision)
    sums = partials.sum(dim=1)
    return out, sums[:, 0].contiguous(), sums[:, 1].contiguous()
