// Device code of the batched convex update (the __global__ wrappers and launchers are in
// convex_update.cu; tests/csrc_emulator/ runs these functions on CPU threads).
//
//   KC = K_b C_b;  C_new_b = (KC <= 0) ? 0 : C_b * sqrt(K_b / KC)   (NaN propagates)
//   delta[b] = sum |C_new_b - C_b|,  mass[b] = sum |C_b|
//
// Default path (bindings.cpp): KC from cuBLAS, then
// 0. convex_elementwise_block: one fused pass over K, C, KC -> C_new and the block's two sums
//    of |C_new - C| and |C| (fixed order), written to its own workspace slot; then 2. below.
// Alternative path (KCM_CUDA_CONVEX=fused):
// 1. convex_update_block: the tiled product K_b C_b (gemm_tile.cuh: K K-major, C N-major)
//    with the update fused in the epilogue, which reads K_b[i][j] and C_b[i][j] of the tile's
//    own elements. Each block reduces its |C_new - C| and |C| (fixed order) and writes the
//    two sums to its own slot of the workspace.
// 2. convex_reduce_block: one block per batch entry sums its slots in double, in a fixed order.
// No atomics anywhere: the same inputs give bit-identical outputs.
#pragma once

#include <cstdint>

#include "gemm_tile.cuh"
#include "kcm_kernels.h"

namespace kcm {
namespace detail {

constexpr int REDUCE_THREADS = 256;
static_assert((REDUCE_THREADS & (REDUCE_THREADS - 1)) == 0, "power-of-two tree");

// Same operations as the reference: division, sqrt, product (all IEEE round-to-nearest).
// kc <= 0 (not kc > 0): a NaN product gives NaN, as the torch backend does.
__device__ __forceinline__ float convex_value(float k, float c, float kc) {
  return kc <= 0.0f ? 0.0f : c * sqrtf(k / kc);
}

struct ConvexEpilogue {
  const float* __restrict__ K;  // this batch entry's n x n matrices
  const float* __restrict__ C;
  float* __restrict__ C_new;
  int n;
  bool vec4;  // n % 4 == 0 and every base pointer 16-byte aligned
  float delta;
  float mass;

  static __device__ __forceinline__ float update(float k, float c, float kc) {
    return convex_value(k, c, kc);
  }

  __device__ __forceinline__ void apply4(int i, int j0, const float* v) {
    if (i >= n || j0 >= n) return;
    const int64_t off = static_cast<int64_t>(i) * n + j0;
    if (vec4 && j0 + 3 < n) {
      const float4 k4 = *reinterpret_cast<const float4*>(K + off);
      const float4 c4 = *reinterpret_cast<const float4*>(C + off);
      float4 o;
      o.x = update(k4.x, c4.x, v[0]);
      o.y = update(k4.y, c4.y, v[1]);
      o.z = update(k4.z, c4.z, v[2]);
      o.w = update(k4.w, c4.w, v[3]);
      *reinterpret_cast<float4*>(C_new + off) = o;
      delta += fabsf(o.x - c4.x) + fabsf(o.y - c4.y) + fabsf(o.z - c4.z) + fabsf(o.w - c4.w);
      mass += fabsf(c4.x) + fabsf(c4.y) + fabsf(c4.z) + fabsf(c4.w);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (j0 + q < n) {
          const float c = C[off + q];
          const float o = update(K[off + q], c, v[q]);
          C_new[off + q] = o;
          delta += fabsf(o - c);
          mass += fabsf(c);
        }
      }
    }
  }
};

// Grid (T, T, batch), T = ceil(n / 128): block (bj, bi, b) computes rows 128 bi.., columns
// 128 bj.. of batch entry b and writes its sums of |C_new - C| and |C| to partials[2 s],
// partials[2 s + 1], s its linear block index.
__device__ __forceinline__ void convex_update_block(const float* __restrict__ K,
                                                    const float* __restrict__ C, int n, bool vec4,
                                                    float* __restrict__ C_new,
                                                    float* __restrict__ partials) {
  __shared__ __align__(128) float smem[SMEM_FLOATS];
  __shared__ float red_delta[WARPS];
  __shared__ float red_mass[WARPS];

  const int64_t batch_off = static_cast<int64_t>(blockIdx.z) * n * n;
  const float* Kb = K + batch_off;
  const float* Cb = C + batch_off;
  const int row0 = blockIdx.y * BM;
  const int col0 = blockIdx.x * BN;

  const int tid = threadIdx.x;
  KMajorTile<F32> la(Kb + static_cast<int64_t>(row0) * n, n, min(BM, n - row0), n, tid);
  NMajorTile lb(Cb + col0, n, min(BN, n - col0), n, tid);
  ConvexEpilogue epi{Kb, Cb, C_new + batch_off, n, vec4, 0.0f, 0.0f};
  gemm_tile(la, lb, n, smem, row0, col0, epi);

  const float block_delta = block_sum(epi.delta, red_delta);
  const float block_mass = block_sum(epi.mass, red_mass);
  if (threadIdx.x == 0) {
    const int64_t slot =
        (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    partials[2 * slot] = block_delta;
    partials[2 * slot + 1] = block_mass;
  }
}

// Blocks per batch entry of the element-wise pass: a function of n only (not of the GPU), so
// the partial sums, and the results, are the same on every GPU. About 16 elements per thread,
// at most 512 blocks per entry (each thread then loops).
__host__ __device__ constexpr int64_t elementwise_blocks(int64_t n) {
  const int64_t per_block = int64_t{THREADS} * 16;
  const int64_t blocks = (n * n + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > 512 ? 512 : blocks);
}

// Grid (elementwise_blocks(n), batch), THREADS threads. Block (p, b) walks the n^2 elements of
// batch entry b with a grid stride, 4 at a time when vec4 (n^2 % 4 == 0 and K, C, KC, C_new
// 16-byte aligned), and writes its two sums to partials[2 s], partials[2 s + 1], s = b P + p.
// KC may alias C_new (each element is read, then written, by one thread): not __restrict__.
__device__ __forceinline__ void convex_elementwise_block(const float* __restrict__ K,
                                                         const float* __restrict__ C,
                                                         const float* KC, int64_t n, bool vec4,
                                                         float* C_new,
                                                         float* __restrict__ partials) {
  __shared__ float red_delta[WARPS];
  __shared__ float red_mass[WARPS];
  const int64_t total = n * n;
  const int64_t off = static_cast<int64_t>(blockIdx.y) * total;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * THREADS;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  float delta = 0.0f;
  float mass = 0.0f;
  if (vec4) {
    const float4* K4 = reinterpret_cast<const float4*>(K + off);
    const float4* C4 = reinterpret_cast<const float4*>(C + off);
    const float4* KC4 = reinterpret_cast<const float4*>(KC + off);
    float4* O4 = reinterpret_cast<float4*>(C_new + off);
    for (int64_t g = first; g < total / 4; g += stride) {
      const float4 k = K4[g];
      const float4 c = C4[g];
      const float4 kc = KC4[g];
      float4 o;
      o.x = convex_value(k.x, c.x, kc.x);
      o.y = convex_value(k.y, c.y, kc.y);
      o.z = convex_value(k.z, c.z, kc.z);
      o.w = convex_value(k.w, c.w, kc.w);
      O4[g] = o;
      delta += fabsf(o.x - c.x) + fabsf(o.y - c.y) + fabsf(o.z - c.z) + fabsf(o.w - c.w);
      mass += fabsf(c.x) + fabsf(c.y) + fabsf(c.z) + fabsf(c.w);
    }
  } else {
    for (int64_t e = first; e < total; e += stride) {
      const float c = C[off + e];
      const float o = convex_value(K[off + e], c, KC[off + e]);
      C_new[off + e] = o;
      delta += fabsf(o - c);
      mass += fabsf(c);
    }
  }
  const float block_delta = block_sum(delta, red_delta);
  const float block_mass = block_sum(mass, red_mass);
  if (threadIdx.x == 0) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    partials[2 * slot] = block_delta;
    partials[2 * slot + 1] = block_mass;
  }
}

// Grid (batch), REDUCE_THREADS threads: block b sums the partials of batch entry b in double
// (strided per-thread sums, then a fixed shared-memory tree).
__device__ __forceinline__ void convex_reduce_block(const float* __restrict__ partials,
                                                    int64_t blocks_per_batch,
                                                    float* __restrict__ delta,
                                                    float* __restrict__ mass) {
  __shared__ double s_delta[REDUCE_THREADS];
  __shared__ double s_mass[REDUCE_THREADS];
  const float* p = partials + 2 * static_cast<int64_t>(blockIdx.x) * blocks_per_batch;
  const int tid = threadIdx.x;
  double a = 0.0;
  double b = 0.0;
  for (int64_t t = tid; t < blocks_per_batch; t += REDUCE_THREADS) {
    a += static_cast<double>(p[2 * t]);
    b += static_cast<double>(p[2 * t + 1]);
  }
  s_delta[tid] = a;
  s_mass[tid] = b;
  __syncthreads();
#pragma unroll
  for (int s = REDUCE_THREADS / 2; s > 0; s /= 2) {
    if (tid < s) {
      s_delta[tid] += s_delta[tid + s];
      s_mass[tid] += s_mass[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    delta[blockIdx.x] = static_cast<float>(s_delta[0]);
    mass[blockIdx.x] = static_cast<float>(s_mass[0]);
  }
}

}  // namespace detail
}  // namespace kcm
