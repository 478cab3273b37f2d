// The __global__ kernels of csrc/*.cu (same names, signatures and launch bounds) over the
// device code of csrc/*.cuh, for NVRTC: CUDA 13's nvcc cannot target sm_70 (V100), and PyPI
// has no CUDA 12 nvcc, but its CUDA 12 NVRTC (nvidia-cuda-nvrtc-cu12) compiles this to
// compute_70 PTX and its ptxas (nvidia-cuda-nvcc-cu12) assembles that for sm_70.
// tests/test_csrc_compile.py::test_sm70_device_code checks registers / spills and that the
// kernel list here matches csrc/*.cu.
#include "gemm_tile.cuh"
#include "convex_update.cuh"
#include "rbf_kernel.cuh"
using namespace kcm;
using namespace kcm::detail;
template <class In>
__global__ void __launch_bounds__(THREADS) row_sqnorm_kernel(const typename In::T* __restrict__ x, int64_t ld, int64_t rows, int d, float* __restrict__ out) { row_sqnorm_block<In>(x, ld, rows, d, out); }
template <class In>
__global__ void __launch_bounds__(THREADS, kMinBlocksPerSm) rbf_tile_kernel(const typename In::T* __restrict__ x, int64_t ldx, const typename In::T* __restrict__ y, int64_t ldy, int n, int m, int d, const float* __restrict__ x_sq, const float* __restrict__ y_sq, float scale, bool symmetric, bool vec4, float* __restrict__ out) { rbf_tile_block<In>(x, ldx, y, ldy, n, m, d, x_sq, y_sq, scale, symmetric, vec4, out); }
__global__ void __launch_bounds__(THREADS) convex_elementwise_kernel(const float* __restrict__ K, const float* __restrict__ C, const float* KC, int64_t n, bool vec4, float* C_new, float* __restrict__ partials) { convex_elementwise_block(K, C, KC, n, vec4, C_new, partials); }
__global__ void __launch_bounds__(THREADS, kMinBlocksPerSm) convex_update_kernel(const float* __restrict__ K, const float* __restrict__ C, int n, bool vec4, float* __restrict__ C_new, float* __restrict__ partials) { convex_update_block(K, C, n, vec4, C_new, partials); }
__global__ void __launch_bounds__(REDUCE_THREADS) convex_reduce_kernel(const float* __restrict__ partials, int64_t b, float* __restrict__ delta, float* __restrict__ mass) { convex_reduce_block(partials, b, delta, mass); }
template __global__ void row_sqnorm_kernel<F32>(const float*, int64_t, int64_t, int, float*);
template __global__ void row_sqnorm_kernel<F16>(const unsigned short*, int64_t, int64_t, int, float*);
template __global__ void row_sqnorm_kernel<BF16>(const unsigned short*, int64_t, int64_t, int, float*);
template __global__ void rbf_tile_kernel<F32>(const float*, int64_t, const float*, int64_t, int, int, int, const float*, const float*, float, bool, bool, float*);
template __global__ void rbf_tile_kernel<F16>(const unsigned short*, int64_t, const unsigned short*, int64_t, int, int, int, const float*, const float*, float, bool, bool, float*);
template __global__ void rbf_tile_kernel<BF16>(const unsigned short*, int64_t, const unsigned short*, int64_t, int, int, int, const float*, const float*, float, bool, bool, float*);
