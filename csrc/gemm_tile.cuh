// The shared-memory tiled GEMM main loop of the kcm kernels, with a fused element-wise epilogue.
//
// One thread block (256 threads) computes a 128 x 128 tile of A B, A: rows x K with unit stride
// along K ("K-major"), B either K-major (B^T given, the RBF case x y^T) or N-major (B given
// row-major, the K @ C case). Tiles of BK = 16 along K go global -> registers -> shared memory,
// two shared-memory stages: the next tile's global loads are in flight while the current one is
// multiplied, and one __syncthreads per K step separates the reuse of a stage.
//
// Shared layout (both operands): S[k][r] with a row pitch of LDS = 132 floats, i.e.
// element (r, k) of the A tile at As[k * LDS + r], element (k, c) of the B tile at
// Bs[k * LDS + c]. The +4 pad keeps 16-byte alignment (float4 loads) and spreads the transposed stores of K-major tiles over the banks.
//
// Inner product, fp32 FMA for every precision (the WMMA TF32 path is retired: TF32 on sm_80+
// runs in the Triton backend, see kcm_cuda/dispatch.py):
//   16 x 16 threads, each an 8 x 8 register tile: rows {ty*4 + 0..3, 64 + ty*4 + 0..3},
//   columns {tx*4 + 0..3, 64 + tx*4 + 0..3}; acc = fmaf(a, b, acc) for k = 0, 1, 2, ...
// The tile goes to the epilogue as runs of 4 consecutive columns:
//   epi.apply4(i, j0, v)   v[q] = (A B)[i][j0 + q], q = 0..3, with i / j0 + q possibly out of
//                          range (the epilogue bounds-checks; j0 is always a multiple of 4).
#pragma once

// KCM_HOST_EMULATION: compiled as plain C++ by tests/csrc_emulator/ (CPU threads stand in
// for CUDA threads) to run the FMA path, the loaders and the epilogues under sanitizers.
#ifndef KCM_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "kcm_kernels.h"

namespace kcm {
namespace detail {

constexpr int BM = kTile;  // rows of the block tile
constexpr int BN = kTile;  // columns of the block tile
constexpr int BK = 16;     // depth of one K step
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PAD = 4;
constexpr int LDS = kTile + PAD;                  // shared row pitch (floats)
constexpr int STAGE_FLOATS = BK * LDS;            // one operand, one stage
constexpr int SMEM_FLOATS = 4 * STAGE_FLOATS;     // {A, B} x 2 stages: 33,792 bytes
constexpr int LOADS_PER_THREAD = BM * BK / THREADS;  // 8 elements per operand per K step

static_assert(BM == BN, "square block tiles");
static_assert(BM * BK % THREADS == 0 && BN * BK % THREADS == 0, "whole loads per thread");
static_assert(THREADS == 256 && BM == 128, "thread layouts below assume 256 threads, 128 tile");
static_assert(LDS % 4 == 0, "float4 alignment of shared rows");

// ---- element types of the inputs (read as raw bits, converted exactly to fp32) ----
struct F32 {
  using T = float;
  static __device__ __forceinline__ float cvt(T v) { return v; }
};
struct F16 {
  using T = unsigned short;
  static __device__ __forceinline__ float cvt(T v) { return __half2float(__ushort_as_half(v)); }
};
struct BF16 {
  using T = unsigned short;
  static __device__ __forceinline__ float cvt(T v) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  }
};

// ---- global -> register -> shared tile loaders ----

// Rows [row0, row0 + 128) x k in [k0, k0 + 16) of a K-major matrix (element (r, k) at
// base[r * ld + k], base already offset to row0). Consecutive threads read consecutive k of a
// row (coalesced), and store transposed into S[k][r]. Out-of-range elements load as 0.
// Load r of thread tid is element (row, k) = (tid / 16 + 16 r, k0 + tid % 16). Offsets from the
// thread's first element are 32-bit: the caller guarantees every offset < 2^31 elements.
template <class In>
struct KMajorTile {
  static_assert(BK == 16 && THREADS % BK == 0, "layout below");
  static constexpr int kRowsPerLoad = THREADS / BK;  // 16
  const typename In::T* __restrict__ p;  // &base[(tid / 16) * ld + tid % 16]
  int row_step;   // 16 * ld
  int rows_left;  // rows - tid / 16: load r valid iff 16 r < rows_left
  int k_left;     // depth - tid % 16: k step k0 valid iff k0 < k_left
  float reg[LOADS_PER_THREAD];

  // b: &A[row0 * ld]; rows: valid rows in this tile (1..128); depth: K.
  __device__ __forceinline__ KMajorTile(const typename In::T* b, int64_t ld, int rows, int depth,
                                        int tid)
      : p(b + (tid / BK) * ld + tid % BK),
        row_step(static_cast<int>(kRowsPerLoad * ld)),
        rows_left(rows - tid / BK),
        k_left(depth - tid % BK) {}

  __device__ __forceinline__ void load(int k0) {
    const bool k_ok = k0 < k_left;
#pragma unroll
    for (int r = 0; r < LOADS_PER_THREAD; ++r) {
      reg[r] = (k_ok && r * kRowsPerLoad < rows_left) ? In::cvt(p[r * row_step + k0]) : 0.0f;
    }
  }
  __device__ __forceinline__ void store(float* s, int tid) const {
    float* q = s + (tid % BK) * LDS + tid / BK;
#pragma unroll
    for (int r = 0; r < LOADS_PER_THREAD; ++r) q[r * kRowsPerLoad] = reg[r];
  }
};

// k in [k0, k0 + 16) x columns [col0, col0 + 128) of an N-major fp32 matrix (element (k, c) at
// base[k * ld + c], base already offset to col0). Consecutive threads read consecutive columns
// and store S[k][c] unchanged. Out-of-range elements load as 0.
// Load r of thread tid is element (k, c) = (k0 + tid / 128 + 2 r, tid % 128); 32-bit offsets
// as above.
struct NMajorTile {
  static constexpr int kKPerLoad = THREADS / BN;  // 2
  const float* __restrict__ p;  // &base[(tid / 128) * ld + tid % 128]
  int ld;
  int k_left;   // depth - tid / 128: element k0 + 2 r valid iff k0 + 2 r < k_left
  bool col_ok;  // tid % 128 < cols
  float reg[LOADS_PER_THREAD];

  // b: &B[col0]; cols: valid columns in this tile (1..128); depth: K.
  __device__ __forceinline__ NMajorTile(const float* b, int64_t ld_, int cols, int depth, int tid)
      : p(b + (tid / BN) * ld_ + tid % BN),
        ld(static_cast<int>(ld_)),
        k_left(depth - tid / BN),
        col_ok(tid % BN < cols) {}

  __device__ __forceinline__ void load(int k0) {
    const float* q = p + static_cast<int64_t>(k0) * ld;
#pragma unroll
    for (int r = 0; r < LOADS_PER_THREAD; ++r) {
      const int kk = r * kKPerLoad;
      reg[r] = (col_ok && k0 + kk < k_left) ? q[kk * ld] : 0.0f;
    }
  }
  __device__ __forceinline__ void store(float* s, int tid) const {
    float* q = s + (tid / BN) * LDS + tid % BN;
#pragma unroll
    for (int r = 0; r < LOADS_PER_THREAD; ++r) q[r * kKPerLoad * LDS] = reg[r];
  }
};

// ---- the main loop ----
template <class LoaderA, class LoaderB, class Epilogue>
__device__ __forceinline__ void gemm_tile(LoaderA& la, LoaderB& lb, int depth, float* smem,
                                              int row0, int col0, Epilogue& epi) {
  const int tid = threadIdx.x;
  const int ty = tid / 16;
  const int tx = tid % 16;
  const int ktiles = (depth + BK - 1) / BK;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  // Prologue: K step 0 into stage 0.
  la.load(0);
  lb.load(0);
  la.store(smem, tid);
  lb.store(smem + STAGE_FLOATS, tid);
  __syncthreads();

  for (int kt = 0; kt < ktiles; ++kt) {
    const float* As = smem + (kt & 1) * 2 * STAGE_FLOATS;
    const float* Bs = As + STAGE_FLOATS;
    const bool more = kt + 1 < ktiles;  // block-uniform
    if (more) {  // global loads of the next step, in flight during the FMAs below
      la.load((kt + 1) * BK);
      lb.load((kt + 1) * BK);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(As + kk * LDS + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(As + kk * LDS + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(Bs + kk * LDS + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(Bs + kk * LDS + 64 + tx * 4);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    if (more) {
      // The other stage was last read in step kt - 1, which ended with __syncthreads().
      float* next = smem + ((kt + 1) & 1) * 2 * STAGE_FLOATS;
      la.store(next, tid);
      lb.store(next + STAGE_FLOATS, tid);
    }
    __syncthreads();  // unconditional: stage handover (and smem free after the last step)
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    epi.apply4(r, col0 + tx * 4, &acc[i][0]);
    epi.apply4(r, col0 + 64 + tx * 4, &acc[i][4]);
  }
}

// The GEMM kernels are compiled for two resident blocks per SM (<= 128 registers per thread,
// 2 x 33.8 KB of shared memory), on every architecture.
constexpr int kMinBlocksPerSm = 2;

// Deterministic sum over the block of one value per thread (fixed order: shuffle tree within
// each warp, then warps 0..7 in order); the result is valid in thread 0 only. Every thread of
// the block must call it. `red` must hold WARPS floats, used by no one else: two calls in a
// row need two different `red` arrays (thread 0 reads the first while others fill the second).
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += red[w];
  }
  return total;
}

}  // namespace detail
}  // namespace kcm
