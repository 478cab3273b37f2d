// Batched convex update: kernels and launchers (the device code is in convex_update.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_tile.cuh"
#include "convex_update.cuh"
#include "kcm_kernels.h"

namespace kcm {
namespace detail {
namespace {

template <int kPrecision>
__global__ void __launch_bounds__(THREADS, min_blocks_per_sm(kPrecision))
    convex_update_kernel(const float* __restrict__ K, const float* __restrict__ C, int n,
                         bool vec4, float* __restrict__ C_new, float* __restrict__ partials) {
  convex_update_block<kPrecision>(K, C, n, vec4, C_new, partials);
}

__global__ void __launch_bounds__(REDUCE_THREADS)
    convex_reduce_kernel(const float* __restrict__ partials, int64_t blocks_per_batch,
                         float* __restrict__ delta, float* __restrict__ mass) {
  convex_reduce_block(partials, blocks_per_batch, delta, mass);
}

inline int64_t tiles_per_side(int64_t n) { return (n + kTile - 1) / kTile; }

}  // namespace
}  // namespace detail

int64_t convex_update_workspace_floats(int64_t batch, int64_t n) {
  const int64_t t = detail::tiles_per_side(n);
  return 2 * batch * t * t;
}

cudaError_t launch_convex_update(const float* K, const float* C, int64_t batch, int64_t n,
                                 Precision precision, float* C_new, float* workspace,
                                 float* delta, float* mass, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (n <= 0) {  // empty matrices: zero sums
    cudaError_t err = cudaMemsetAsync(delta, 0, sizeof(float) * batch, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(mass, 0, sizeof(float) * batch, stream);
    return err;
  }
  const int64_t t = detail::tiles_per_side(n);
  const dim3 grid(static_cast<unsigned int>(t), static_cast<unsigned int>(t),
                  static_cast<unsigned int>(batch));
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec4 = (n % 4 == 0) && aligned(K) && aligned(C) && aligned(C_new);
  const int ni = static_cast<int>(n);
  switch (precision) {
    case Precision::kTf32:
      detail::convex_update_kernel<1>
          <<<grid, detail::THREADS, 0, stream>>>(K, C, ni, vec4, C_new, workspace);
      break;
    case Precision::kTf32x3:
      detail::convex_update_kernel<2>
          <<<grid, detail::THREADS, 0, stream>>>(K, C, ni, vec4, C_new, workspace);
      break;
    case Precision::kIeee:
    default:
      detail::convex_update_kernel<0>
          <<<grid, detail::THREADS, 0, stream>>>(K, C, ni, vec4, C_new, workspace);
      break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  detail::convex_reduce_kernel<<<static_cast<unsigned int>(batch), detail::REDUCE_THREADS, 0,
                                 stream>>>(workspace, t * t, delta, mass);
  return cudaGetLastError();
}

}  // namespace kcm
