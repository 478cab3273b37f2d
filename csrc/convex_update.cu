// Batched convex update: kernels and launchers (the device code is in convex_update.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_tile.cuh"
#include "convex_update.cuh"
#include "kcm_kernels.h"

namespace kcm {
namespace detail {
namespace {

__global__ void __launch_bounds__(THREADS)
    convex_elementwise_kernel(const float* __restrict__ K, const float* __restrict__ C,
                              const float* KC, int64_t n, bool vec4, float* C_new,
                              float* __restrict__ partials) {
  convex_elementwise_block(K, C, KC, n, vec4, C_new, partials);
}

__global__ void __launch_bounds__(THREADS, kMinBlocksPerSm)
    convex_update_kernel(const float* __restrict__ K, const float* __restrict__ C, int n,
                         bool vec4, float* __restrict__ C_new, float* __restrict__ partials) {
  convex_update_block(K, C, n, vec4, C_new, partials);
}

__global__ void __launch_bounds__(REDUCE_THREADS)
    convex_reduce_kernel(const float* __restrict__ partials, int64_t blocks_per_batch,
                         float* __restrict__ delta, float* __restrict__ mass) {
  convex_reduce_block(partials, blocks_per_batch, delta, mass);
}

inline int64_t tiles_per_side(int64_t n) { return (n + kTile - 1) / kTile; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cudaError_t zero_sums(int64_t batch, float* delta, float* mass, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(delta, 0, sizeof(float) * batch, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(mass, 0, sizeof(float) * batch, stream);
  return err;
}

}  // namespace
}  // namespace detail

int64_t convex_epilogue_workspace_floats(int64_t batch, int64_t n) {
  return 2 * batch * detail::elementwise_blocks(n);
}

cudaError_t launch_convex_epilogue(const float* K, const float* C, const float* KC, int64_t batch,
                                   int64_t n, float* C_new, float* workspace, float* delta,
                                   float* mass, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (n <= 0) return detail::zero_sums(batch, delta, mass, stream);
  const int64_t blocks = detail::elementwise_blocks(n);
  const bool vec4 = (n * n) % 4 == 0 && detail::aligned16(K) && detail::aligned16(C) &&
                    detail::aligned16(KC) && detail::aligned16(C_new);
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(batch));
  detail::convex_elementwise_kernel<<<grid, detail::THREADS, 0, stream>>>(K, C, KC, n, vec4,
                                                                          C_new, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  detail::convex_reduce_kernel<<<static_cast<unsigned int>(batch), detail::REDUCE_THREADS, 0,
                                 stream>>>(workspace, blocks, delta, mass);
  return cudaGetLastError();
}

int64_t convex_update_workspace_floats(int64_t batch, int64_t n) {
  const int64_t t = detail::tiles_per_side(n);
  return 2 * batch * t * t;
}

cudaError_t launch_convex_update_fused(const float* K, const float* C, int64_t batch, int64_t n,
                                       float* C_new, float* workspace, float* delta, float* mass,
                                       cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (n <= 0) return detail::zero_sums(batch, delta, mass, stream);
  const int64_t t = detail::tiles_per_side(n);
  const dim3 grid(static_cast<unsigned int>(t), static_cast<unsigned int>(t),
                  static_cast<unsigned int>(batch));
  const bool vec4 = (n % 4 == 0) && detail::aligned16(K) && detail::aligned16(C) &&
                    detail::aligned16(C_new);
  detail::convex_update_kernel<<<grid, detail::THREADS, 0, stream>>>(
      K, C, static_cast<int>(n), vec4, C_new, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  detail::convex_reduce_kernel<<<static_cast<unsigned int>(batch), detail::REDUCE_THREADS, 0,
                                 stream>>>(workspace, t * t, delta, mass);
  return cudaGetLastError();
}

}  // namespace kcm
