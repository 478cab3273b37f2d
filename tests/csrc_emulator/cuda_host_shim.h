// Host stand-ins for the CUDA built-ins used by csrc/*.cuh, so that the kernels' device code
// compiles as plain C++ and runs on CPU threads: one std::thread per CUDA thread, a
// std::barrier per block for __syncthreads(), a std::barrier per warp for the shuffles, and
// __shared__ arrays as function statics (the emulator runs one block at a time).
// The kernels have one path (fp32 FMA), the same on every architecture.
#pragma once

#ifndef KCM_HOST_EMULATION
#error "define KCM_HOST_EMULATION before including cuda_host_shim.h"
#endif

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct float4 {
  float x, y, z, w;
};
struct __half {
  unsigned short bits;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 gridDim;
inline thread_local dim3 blockDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline float __uint_as_float(unsigned int u) { return std::bit_cast<float>(u); }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits)); }

struct EmuBlock {
  explicit EmuBlock(int threads) : block(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new std::barrier<>(32));
    shuffle.resize(static_cast<size_t>(threads));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;
};
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block.arrive_and_wait(); }

inline float __shfl_down_sync(unsigned int /*mask: always full here*/, float v, int off) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  std::barrier<>& warp = *emu_block->warps[static_cast<size_t>(tid / 32)];
  emu_block->shuffle[static_cast<size_t>(tid)] = v;
  warp.arrive_and_wait();
  const float r = lane + off < 32 ? emu_block->shuffle[static_cast<size_t>(tid + off)] : v;
  warp.arrive_and_wait();
  return r;
}

// Runs body() as every thread of every block of the grid, one block at a time: `threads`
// CPU threads walk the blocks in order, separated by a block-wide barrier (so a block's
// shared-memory statics are handed to the next block race-free).
template <class Body>
void emu_launch(dim3 grid, int threads, Body body) {
  EmuBlock block(threads);
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      emu_block = &block;
      threadIdx = uint3{static_cast<unsigned int>(t), 0, 0};
      gridDim = grid;
      blockDim = dim3{static_cast<unsigned int>(threads), 1, 1};
      for (unsigned int z = 0; z < grid.z; ++z) {
        for (unsigned int y = 0; y < grid.y; ++y) {
          for (unsigned int x = 0; x < grid.x; ++x) {
            blockIdx = uint3{x, y, z};
            body();
            block.block.arrive_and_wait();  // the block is over for every thread
          }
        }
      }
    });
  }
  for (auto& th : pool) th.join();
}
