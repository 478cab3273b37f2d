// Gaussian RBF kernel matrix: kernels and launchers (the device code is in rbf_kernel.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_tile.cuh"
#include "kcm_kernels.h"
#include "rbf_kernel.cuh"

namespace kcm {
namespace detail {
namespace {

template <class In>
__global__ void __launch_bounds__(THREADS)
    row_sqnorm_kernel(const typename In::T* __restrict__ x, int64_t ld, int64_t rows, int d,
                      float* __restrict__ out) {
  row_sqnorm_block<In>(x, ld, rows, d, out);
}

template <class In>
__global__ void __launch_bounds__(THREADS, kMinBlocksPerSm)
    rbf_tile_kernel(const typename In::T* __restrict__ x, int64_t ldx,
                    const typename In::T* __restrict__ y, int64_t ldy, int n, int m, int d,
                    const float* __restrict__ x_sq, const float* __restrict__ y_sq, float scale,
                    bool symmetric, bool vec4, float* __restrict__ out) {
  rbf_tile_block<In>(x, ldx, y, ldy, n, m, d, x_sq, y_sq, scale, symmetric, vec4, out);
}

template <class In>
cudaError_t launch_norms_typed(const void* x, int64_t rows, int64_t d, int64_t ld, float* out,
                               cudaStream_t stream) {
  constexpr int kRowsPerBlock = THREADS / 32;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  row_sqnorm_kernel<In><<<static_cast<unsigned int>(blocks), THREADS, 0, stream>>>(
      static_cast<const typename In::T*>(x), ld, rows, static_cast<int>(d), out);
  return cudaGetLastError();
}

template <class In>
cudaError_t launch_rbf_typed(const void* x, int64_t ldx, const void* y, int64_t ldy, int64_t n,
                             int64_t m, int64_t d, const float* x_sq, const float* y_sq,
                             float scale, bool symmetric, float* out, cudaStream_t stream) {
  using T = typename In::T;
  const dim3 grid(static_cast<unsigned int>((m + BN - 1) / BN),
                  static_cast<unsigned int>((n + BM - 1) / BM));
  const bool vec4 = (m % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), di = static_cast<int>(d);
  rbf_tile_kernel<In><<<grid, THREADS, 0, stream>>>(xp, ldx, yp, ldy, ni, mi, di, x_sq, y_sq,
                                                     scale, symmetric, vec4, out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

cudaError_t launch_row_sqnorms(const void* x, InputType type, int64_t rows, int64_t d, int64_t ld,
                               float* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  switch (type) {
    case InputType::kFloat16:
      return detail::launch_norms_typed<detail::F16>(x, rows, d, ld, out, stream);
    case InputType::kBFloat16:
      return detail::launch_norms_typed<detail::BF16>(x, rows, d, ld, out, stream);
    case InputType::kFloat32:
      return detail::launch_norms_typed<detail::F32>(x, rows, d, ld, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_rbf_kernel(const void* x, int64_t ldx, const void* y, int64_t ldy,
                              InputType type, int64_t n, int64_t m, int64_t d, const float* x_sq,
                              const float* y_sq, float neg_half_inv_sigma_sq, bool symmetric,
                              float* out, cudaStream_t stream) {
  if (n <= 0 || m <= 0) return cudaSuccess;
  if (symmetric && (m != n || y != x || y_sq != x_sq || ldy != ldx)) return cudaErrorInvalidValue;
  switch (type) {
    case InputType::kFloat16:
      return detail::launch_rbf_typed<detail::F16>(x, ldx, y, ldy, n, m, d, x_sq, y_sq,
                                                   neg_half_inv_sigma_sq, symmetric,
                                                   out, stream);
    case InputType::kBFloat16:
      return detail::launch_rbf_typed<detail::BF16>(x, ldx, y, ldy, n, m, d, x_sq, y_sq,
                                                    neg_half_inv_sigma_sq, symmetric,
                                                    out, stream);
    case InputType::kFloat32:
      return detail::launch_rbf_typed<detail::F32>(x, ldx, y, ldy, n, m, d, x_sq, y_sq,
                                                   neg_half_inv_sigma_sq, symmetric,
                                                   out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kcm
