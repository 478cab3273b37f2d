// Plain-pointer launchers of the kcm CUDA kernels (no torch types: bindings.cpp is the glue).
//
// Every launcher enqueues its kernels on `stream`, then returns cudaGetLastError(): cudaSuccess
// when the launches were accepted. Sizes are validated by the caller (bindings.cpp):
// n, m, d >= 1, every count < 2^31, n <= kMaxRowsPerGrid (grid.y limit), batch <= 65535.
#pragma once

#ifndef KCM_HOST_EMULATION  // tests/csrc_emulator/ provides cudaStream_t / cudaError_t
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace kcm {

// The precision the caller asked for (bindings.cpp). The hand-written GEMM kernels below
// compute in fp32 FMA for every precision (at least as accurate as TF32); only the convex
// update's cuBLAS product uses TF32 tensor cores, for kTf32.
enum class Precision : int {
  kIeee = 0,    // fp32
  kTf32 = 1,    // one TF32 product allowed
  kTf32x3 = 2,  // close to fp32 accuracy (computed in fp32)
};

// Element type of the point matrices given to the RBF launchers (read as raw bits).
enum class InputType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Output tile edge of the GEMM kernels (128 x 128 per thread block).
constexpr int kTile = 128;
// The row tiles of a launch run on grid.y (at most 65535 blocks).
constexpr int64_t kMaxRowsPerGrid = int64_t{65535} * kTile;

// out[i] = sum_k x[i, k]^2 in fp32 (ascending-k FMA chains per lane, fixed-order warp reduce).
// x: rows x d, element (i, k) at x[i * ld + k].
cudaError_t launch_row_sqnorms(const void* x, InputType type, int64_t rows, int64_t d, int64_t ld,
                               float* out, cudaStream_t stream);

// out (n x m, row-major, contiguous) = exp(-max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) / (2 sigma^2)).
// x: n x d with row stride ldx (unit column stride), y: m x d with row stride ldy, both of
// `type`. x_sq / y_sq: the fp32 squared row norms (launch_row_sqnorms).
// symmetric: y must be x (and m == n, y_sq == x_sq); only tiles on or above the diagonal are
// computed, each value is written to (i, j) and (j, i), and the diagonal is exactly 1.
// neg_half_inv_sigma_sq = -1 / (2 sigma^2).
cudaError_t launch_rbf_kernel(const void* x, int64_t ldx, const void* y, int64_t ldy,
                              InputType type, int64_t n, int64_t m, int64_t d, const float* x_sq,
                              const float* y_sq, float neg_half_inv_sigma_sq, bool symmetric,
                              float* out, cudaStream_t stream);

// The convex update, for b < batch, with K_b, C_b the contiguous row-major n x n matrices at
// K + b n^2, C + b n^2 (NaN propagates: a NaN product or K gives a NaN coefficient):
//   KC = K_b C_b;  C_new_b = (KC <= 0) ? 0 : C_b * sqrt(K_b / KC)
//   delta[b] = sum |C_new_b - C_b|,  mass[b] = sum |C_b|
// Each thread block writes its two partial sums to `workspace` (no atomics), a second kernel
// reduces them in double in a fixed order: the results are deterministic.

// Number of floats the workspace of launch_convex_epilogue must hold.
int64_t convex_epilogue_workspace_floats(int64_t batch, int64_t n);

// The element-wise part, given the product KC (computed by cuBLAS in bindings.cpp): one fused
// pass reads K, C, KC, writes C_new and the per-block sums, then the fixed-order reduction.
// KC may be C_new itself (in place: each element is read before it is written, by the same
// thread); C_new must not overlap K or C.
cudaError_t launch_convex_epilogue(const float* K, const float* C, const float* KC, int64_t batch,
                                   int64_t n, float* C_new, float* workspace, float* delta,
                                   float* mass, cudaStream_t stream);

// Number of floats the workspace of launch_convex_update_fused must hold.
int64_t convex_update_workspace_floats(int64_t batch, int64_t n);

// The whole update in one tiled fp32 FMA GEMM kernel with the update fused in its epilogue (no
// KC in memory), then the reduction. Kept as an alternative (KCM_CUDA_CONVEX=fused) for GPUs
// where cuBLAS SGEMM would lose. C_new must not overlap K or C.
cudaError_t launch_convex_update_fused(const float* K, const float* C, int64_t batch, int64_t n,
                                       float* C_new, float* workspace, float* delta, float* mass,
                                       cudaStream_t stream);

}  // namespace kcm
