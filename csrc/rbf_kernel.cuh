// Device code of the RBF kernel matrix (the __global__ wrappers and launchers are in
// rbf_kernel.cu; tests/csrc_emulator/ runs these functions on CPU threads).
//
//   K_ij = exp(-max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) / (2 sigma^2))
//
// 1. row_sqnorm_block: |x_i|^2 in fp32, one warp per row (lanes stride over k with ascending
//    FMA chains, then a fixed-order shuffle reduction).
// 2. rbf_tile_block: the tiled x y^T product (gemm_tile.cuh, both operands K-major) with the
//    distance and exp fused in the epilogue. Symmetric mode (y = x): only block tiles with
//    bi <= bj run; of each tile only elements i < j are computed and written to (i, j) and
//    (j, i) with the same value, and i == j is written as exactly 1.0 (NaN for a NaN point):
//    the result is exactly
//    symmetric whatever the order of accumulation inside the tile.
// NaN in a row of x or y gives NaN in that row / column of K, the diagonal element included.
#pragma once

#include <cstdint>

#include "gemm_tile.cuh"
#include "kcm_kernels.h"

namespace kcm {
namespace detail {

// Block of THREADS threads = 8 warps = 8 rows, block b: rows 8 b .. 8 b + 7.
template <class In>
__device__ __forceinline__ void row_sqnorm_block(const typename In::T* __restrict__ x, int64_t ld,
                                                 int64_t rows, int d, float* __restrict__ out) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform: the full-mask shuffles below are safe
  const typename In::T* p = x + row * ld;
  float acc = 0.0f;
  for (int k = lane; k < d; k += 32) {
    const float v = In::cvt(p[k]);
    acc = fmaf(v, v, acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[row] = acc;
}

struct RbfEpilogue {
  float* __restrict__ out;  // n x m, contiguous
  const float* __restrict__ x_sq;
  const float* __restrict__ y_sq;
  int n;
  int m;
  float scale;  // -1 / (2 sigma^2)
  bool symmetric;
  bool vec4;  // m % 4 == 0 and out 16-byte aligned: float4 row stores allowed

  __device__ __forceinline__ float value(float xi_sq, int j, float dot) const {
    // Clamp the cancellation error below 0, but let NaN through (fmaxf would turn a NaN
    // distance into 0, i.e. K = 1): NaN inputs give NaN, as in the torch backend.
    const float raw = fmaf(-2.0f, dot, xi_sq + y_sq[j]);
    const float sq_dist = raw < 0.0f ? 0.0f : raw;
    return expf(sq_dist * scale);
  }

  __device__ __forceinline__ void apply4(int i, int j0, const float* v) {
    if (i >= n || j0 >= m) return;
    const float xi_sq = x_sq[i];
    float* row = out + static_cast<int64_t>(i) * m;
    if (!symmetric) {
      if (vec4 && j0 + 3 < m) {
        float4 o;
        o.x = value(xi_sq, j0, v[0]);
        o.y = value(xi_sq, j0 + 1, v[1]);
        o.z = value(xi_sq, j0 + 2, v[2]);
        o.w = value(xi_sq, j0 + 3, v[3]);
        *reinterpret_cast<float4*>(row + j0) = o;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (j0 + q < m) row[j0 + q] = value(xi_sq, j0 + q, v[q]);
        }
      }
      return;
    }
    // Symmetric (m == n). i > j happens only in diagonal block tiles, where element (j, i) of
    // the same tile writes both places.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + q;
      if (j < m && i <= j) {
        // The diagonal is exactly 1, or NaN for a NaN point (xi_sq != xi_sq), as in the torch
        // and Triton backends.
        const float k = (i == j) ? (xi_sq != xi_sq ? xi_sq : 1.0f) : value(xi_sq, j, v[q]);
        row[j] = k;
        if (i != j) out[static_cast<int64_t>(j) * m + i] = k;
      }
    }
  }
};

// Grid (ceil(m / 128), ceil(n / 128)); block (bj, bi) computes rows 128 bi.., columns 128 bj..
template <class In>
__device__ __forceinline__ void rbf_tile_block(const typename In::T* __restrict__ x, int64_t ldx,
                                               const typename In::T* __restrict__ y, int64_t ldy,
                                               int n, int m, int d, const float* __restrict__ x_sq,
                                               const float* __restrict__ y_sq, float scale,
                                               bool symmetric, bool vec4, float* __restrict__ out) {
  const int bi = blockIdx.y;  // row tile
  const int bj = blockIdx.x;  // column tile
  if (symmetric && bi > bj) return;  // block-uniform, before any barrier

  __shared__ __align__(128) float smem[SMEM_FLOATS];
  const int row0 = bi * BM;
  const int col0 = bj * BN;
  const int tid = threadIdx.x;
  KMajorTile<In> la(x + row0 * ldx, ldx, min(BM, n - row0), d, tid);
  KMajorTile<In> lb(y + col0 * ldy, ldy, min(BN, m - col0), d, tid);
  RbfEpilogue epi{out, x_sq, y_sq, n, m, scale, symmetric, vec4};
  gemm_tile(la, lb, d, smem, row0, col0, epi);
}

}  // namespace detail
}  // namespace kcm
