// The shared-memory tiled GEMM main loop of the kcm kernels, with a fused element-wise epilogue.
//
// One thread block (256 threads) computes a 128 x 128 tile of A B, A: rows x K with unit stride
// along K ("K-major"), B either K-major (B^T given, the RBF case x y^T) or N-major (B given
// row-major, the K @ C case). Tiles of BK = 16 along K go global -> registers -> shared memory,
// two shared-memory stages: the next tile's global loads are in flight while the current one is
// multiplied, and one __syncthreads per K step separates the reuse of a stage.
//
// Shared layout (both operands, both paths): S[k][r] with a row pitch of LDS = 132 floats, i.e.
// element (r, k) of the A tile at As[k * LDS + r], element (k, c) of the B tile at
// Bs[k * LDS + c]. The +4 pad keeps 16-byte alignment (float4, WMMA ldm % 4 == 0, 32-byte
// aligned fragment pointers) and spreads the transposed stores of K-major tiles over the banks.
//
// Two inner products:
//   * FMA path (Precision::kIeee everywhere; every precision on code built for < sm_80):
//     16 x 16 threads, each an 8 x 8 register tile: rows {ty*4 + 0..3, 64 + ty*4 + 0..3},
//     columns {tx*4 + 0..3, 64 + tx*4 + 0..3}; acc = fmaf(a, b, acc) for k = 0, 1, 2, ...
//   * tensor-core path (kTf32 / kTf32x3, code built for sm_80+): 8 warps as 2 (rows) x 4 (cols),
//     each a 64 x 32 warp tile = 4 x 2 WMMA m16n16k8 TF32 fragments. Inputs are rounded to
//     TF32 with cvt.rna (wmma::__float_to_tf32); kTf32x3 adds the two cross terms of the
//     hi/lo split (x = hi + lo, lo = tf32(x - hi)). Each K step (16) is multiplied into a
//     zeroed fragment and added to the fp32 accumulator with round-to-nearest FADDs, so the
//     tensor cores' truncating accumulation never spans more than one K step.
// Both paths hand the tile to the epilogue as runs of 4 consecutive columns:
//   epi.apply4(i, j0, v)   v[q] = (A B)[i][j0 + q], q = 0..3, with i / j0 + q possibly out of
//                          range (the epilogue bounds-checks; j0 is always a multiple of 4).
#pragma once

// KCM_HOST_EMULATION: compiled as plain C++ by tests/csrc_emulator/ (CPU threads stand in
// for CUDA threads) to run the FMA path, the loaders and the epilogues under sanitizers.
#ifndef KCM_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cstdint>

#include "kcm_kernels.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define KCM_TF32_MMA 1
#else
#define KCM_TF32_MMA 0
#endif

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
// Epilogue staging of the tensor-core path: one 16 x 16 fragment per warp, pitch 20 floats.
constexpr int STAGE_LD = 20;
constexpr int WARP_STAGE_FLOATS = 16 * STAGE_LD;

static_assert(BM == BN, "square block tiles");
static_assert(BM * BK % THREADS == 0 && BN * BK % THREADS == 0, "whole loads per thread");
static_assert(BK % 8 == 0, "WMMA TF32 k-step is 8");
static_assert(THREADS == 256 && BM == 128, "thread layouts below assume 256 threads, 128 tile");
static_assert(LDS % 4 == 0, "float4 / WMMA alignment of shared rows");
static_assert(STAGE_LD % 4 == 0 && WARP_STAGE_FLOATS % 8 == 0, "WMMA store alignment");
static_assert(WARPS * WARP_STAGE_FLOATS <= SMEM_FLOATS, "staging fits in the main-loop smem");

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

// ---- FMA path ----
template <class LoaderA, class LoaderB, class Epilogue>
__device__ __forceinline__ void gemm_tile_fma(LoaderA& la, LoaderB& lb, int depth, float* smem,
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

// ---- tensor-core path (only compiled for sm_80+) ----
#if KCM_TF32_MMA
// hi = tf32(v) (round to nearest, ties away: cvt.rna); with kSplit also lo = tf32(v - hi),
// where v - hi is exact in fp32. Elements of two fragments of one type map to the same
// matrix positions, so the split is element-wise.
template <bool kSplit, class Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float v = hi.x[t];
    const float h = nvcuda::wmma::__float_to_tf32(v);
    hi.x[t] = h;
    if constexpr (kSplit) lo.x[t] = nvcuda::wmma::__float_to_tf32(v - h);
  }
  if constexpr (!kSplit) (void)lo;
}
#endif

template <bool kSplit, class LoaderA, class LoaderB, class Epilogue>
__device__ __forceinline__ void gemm_tile_tf32(LoaderA& la, LoaderB& lb, int depth, float* smem,
                                               int row0, int col0, Epilogue& epi) {
#if KCM_TF32_MMA
  using namespace nvcuda;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wm = warp / 4;  // 0..1: rows wm*64 .. +63
  const int wn = warp % 4;  // 0..3: cols wn*32 .. +31
  const int ktiles = (depth + BK - 1) / BK;

  FragC acc[4][2];
#pragma unroll
  for (int fm = 0; fm < 4; ++fm) {
#pragma unroll
    for (int fn = 0; fn < 2; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);
  }

  la.load(0);
  lb.load(0);
  la.store(smem, tid);
  lb.store(smem + STAGE_FLOATS, tid);
  __syncthreads();

  for (int kt = 0; kt < ktiles; ++kt) {
    const float* As = smem + (kt & 1) * 2 * STAGE_FLOATS;
    const float* Bs = As + STAGE_FLOATS;
    const bool more = kt + 1 < ktiles;
    if (more) {
      la.load((kt + 1) * BK);
      lb.load((kt + 1) * BK);
    }
    // B fragments of the whole K step (both k8 halves), converted once.
    constexpr int KS = BK / 8;
    FragB b_hi[KS][2], b_lo[KS][2];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int fn = 0; fn < 2; ++fn) {
        // row_major B: element (k, c) of the 8 x 16 block at p[k * LDS + c] = Bs[k][n].
        wmma::load_matrix_sync(b_hi[ks][fn], Bs + ks * 8 * LDS + wn * 32 + fn * 16, LDS);
        split_tf32<kSplit>(b_hi[ks][fn], b_lo[ks][fn]);
      }
    }
#pragma unroll
    for (int fm = 0; fm < 4; ++fm) {
      FragA a_hi[KS], a_lo[KS];
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // col_major A: element (r, c) of the 16 x 8 block at p[c * LDS + r] = As[k][m].
        wmma::load_matrix_sync(a_hi[ks], As + ks * 8 * LDS + wm * 64 + fm * 16, LDS);
        split_tf32<kSplit>(a_hi[ks], a_lo[ks]);
      }
#pragma unroll
      for (int fn = 0; fn < 2; ++fn) {
        // This K step's products go to a fresh fragment, then into acc with an fp32
        // round-to-nearest add: the tensor cores' truncating accumulation only ever sums the
        // 16 (48 for the split) products of one step, and the long sum over K is rounded to
        // nearest like the FMA path's.
        FragC part;
        wmma::fill_fragment(part, 0.0f);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          if constexpr (kSplit) {  // small terms first
            wmma::mma_sync(part, a_lo[ks], b_hi[ks][fn], part);
            wmma::mma_sync(part, a_hi[ks], b_lo[ks][fn], part);
          }
          wmma::mma_sync(part, a_hi[ks], b_hi[ks][fn], part);
        }
#pragma unroll
        for (int t = 0; t < part.num_elements; ++t) acc[fm][fn].x[t] += part.x[t];
      }
    }
    if (more) {
      float* next = smem + ((kt + 1) & 1) * 2 * STAGE_FLOATS;
      la.store(next, tid);
      lb.store(next + STAGE_FLOATS, tid);
    }
    __syncthreads();  // unconditional: after the last step every warp is done with smem
  }

  // Epilogue: each warp stages one fragment at a time in its own slice of the (now free)
  // main-loop smem; lane l then owns row l / 2, columns (l % 2) * 8 .. + 7 of the fragment.
  float* stage = smem + warp * WARP_STAGE_FLOATS;
  const int r = lane / 2;
  const int c = (lane % 2) * 8;
#pragma unroll
  for (int fm = 0; fm < 4; ++fm) {
#pragma unroll
    for (int fn = 0; fn < 2; ++fn) {
      wmma::store_matrix_sync(stage, acc[fm][fn], STAGE_LD, wmma::mem_row_major);
      __syncwarp();
      float v[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = stage[r * STAGE_LD + c + q];
      __syncwarp();  // every lane has read the slice before the next fragment overwrites it
      const int gi = row0 + wm * 64 + fm * 16 + r;
      const int gj = col0 + wn * 32 + fn * 16 + c;
      epi.apply4(gi, gj, &v[0]);
      epi.apply4(gi, gj + 4, &v[4]);
    }
  }
#else
  // Never instantiated for < sm_80 (gemm_tile() picks the FMA path there).
  (void)la; (void)lb; (void)depth; (void)smem; (void)row0; (void)col0; (void)epi;
#endif
}

// Picks the path for the architecture this code is compiled for.
template <int kPrecision, class LoaderA, class LoaderB, class Epilogue>
__device__ __forceinline__ void gemm_tile(LoaderA& la, LoaderB& lb, int depth, float* smem,
                                          int row0, int col0, Epilogue& epi) {
  constexpr bool kTensorCores = KCM_TF32_MMA && kPrecision != static_cast<int>(Precision::kIeee);
  if constexpr (kTensorCores) {
    constexpr bool kSplit = kPrecision == static_cast<int>(Precision::kTf32x3);
    gemm_tile_tf32<kSplit>(la, lb, depth, smem, row0, col0, epi);
  } else {
    gemm_tile_fma(la, lb, depth, smem, row0, col0, epi);
  }
}

// Occupancy target of the GEMM kernels: the FMA path fits two blocks per SM in <= 128
// registers; the tensor-core paths hold twice the operand fragments and get one.
__host__ __device__ constexpr int min_blocks_per_sm(int precision) {
  return precision == static_cast<int>(Precision::kIeee) ? 2 : 1;
}

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
