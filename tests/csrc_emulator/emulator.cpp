// Runs the device code of csrc/rbf_kernel.cuh and csrc/convex_update.cuh on CPU threads (see
// cuda_host_shim.h), with the grids and flags that the launchers in csrc/*.cu compute.
// Built and driven by tests/test_csrc_emulation.py, under AddressSanitizer (bounds) or
// ThreadSanitizer (missing barriers).
//
//   emulator rbf TYPE N M D LDX LDY SYM SIGMA OUT_OFFSET XFILE YFILE OUTFILE
//       TYPE 0 float32, 1 float16, 2 bfloat16 (raw elements, row stride LDX / LDY).
//       SYM 1: y = x (YFILE ignored). OUTFILE: N*M float32.
//   emulator convex B N OUT_OFFSET KFILE CFILE OUTFILE
//       the fused tiled kernel (launch_convex_update_fused).
//       OUTFILE: C_new (B*N*N float32), then delta (B), then mass (B).
//   emulator epilogue B N OUT_OFFSET INPLACE KFILE CFILE KCFILE OUTFILE
//       the element-wise pass of the default path (launch_convex_epilogue) given KC = K C;
//       INPLACE 1: KC is copied into the C_new buffer and updated there (as bindings.cpp does).
//       OUTFILE as for convex.
//   OUT_OFFSET: the output starts that many floats into its buffer (1: not 16-byte aligned).
#define KCM_HOST_EMULATION 1
#include "cuda_host_shim.h"
// clang-format off
#include "convex_update.cuh"
#include "rbf_kernel.cuh"
// clang-format on

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

namespace {

using namespace kcm;
using namespace kcm::detail;

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path);
    std::exit(2);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const char* path, const float* data, size_t count) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
}

// Exact-size heap copies, so that AddressSanitizer sees any read past the last element.
template <class T>
std::unique_ptr<T[]> exact_copy(const std::vector<char>& bytes) {
  const size_t count = bytes.size() / sizeof(T);
  std::unique_ptr<T[]> out(new T[count]);
  std::memcpy(out.get(), bytes.data(), count * sizeof(T));
  return out;
}

template <class In>
void run_rbf(const void* xv, const void* yv, int64_t n, int64_t m, int64_t d, int64_t ldx,
             int64_t ldy, bool sym, float scale, float* out) {
  using T = typename In::T;
  const T* x = static_cast<const T*>(xv);
  const T* y = sym ? x : static_cast<const T*>(yv);
  if (sym) ldy = ldx;
  std::unique_ptr<float[]> x_sq(new float[static_cast<size_t>(n)]);
  std::unique_ptr<float[]> y_sq(sym ? nullptr : new float[static_cast<size_t>(m)]);
  const auto norms = [&](const T* p, int64_t rows, int64_t ld, float* o) {
    const dim3 grid{static_cast<unsigned int>((rows + 7) / 8), 1, 1};
    emu_launch(grid, THREADS, [&] { row_sqnorm_block<In>(p, ld, rows, static_cast<int>(d), o); });
  };
  norms(x, n, ldx, x_sq.get());
  if (!sym) norms(y, m, ldy, y_sq.get());
  const float* ysq = sym ? x_sq.get() : y_sq.get();
  const dim3 grid{static_cast<unsigned int>((m + BN - 1) / BN),
                  static_cast<unsigned int>((n + BM - 1) / BM), 1};
  const bool vec4 = (m % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  emu_launch(grid, THREADS, [&] {
    rbf_tile_block<In>(x, ldx, y, ldy, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(d), x_sq.get(), ysq, scale, sym, vec4, out);
  });
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// As launch_convex_update_fused.
void run_convex(const float* K, const float* C, int64_t batch, int64_t n, float* C_new,
                float* delta, float* mass) {
  const int64_t t = (n + kTile - 1) / kTile;
  std::vector<float> partials(static_cast<size_t>(2 * batch * t * t));
  const bool vec4 = (n % 4 == 0) && aligned16(K) && aligned16(C) && aligned16(C_new);
  const dim3 grid{static_cast<unsigned int>(t), static_cast<unsigned int>(t),
                  static_cast<unsigned int>(batch)};
  float* part = partials.data();
  emu_launch(grid, THREADS, [&] {
    convex_update_block(K, C, static_cast<int>(n), vec4, C_new, part);
  });
  emu_launch(dim3{static_cast<unsigned int>(batch), 1, 1}, REDUCE_THREADS,
             [&] { convex_reduce_block(part, t * t, delta, mass); });
}

// As launch_convex_epilogue.
void run_epilogue(const float* K, const float* C, const float* KC, int64_t batch, int64_t n,
                  float* C_new, float* delta, float* mass) {
  const int64_t blocks = elementwise_blocks(n);
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(2 * batch * blocks)]);
  const bool vec4 =
      (n * n) % 4 == 0 && aligned16(K) && aligned16(C) && aligned16(KC) && aligned16(C_new);
  const dim3 grid{static_cast<unsigned int>(blocks), static_cast<unsigned int>(batch), 1};
  float* part = partials.get();
  emu_launch(grid, THREADS, [&] { convex_elementwise_block(K, C, KC, n, vec4, C_new, part); });
  emu_launch(dim3{static_cast<unsigned int>(batch), 1, 1}, REDUCE_THREADS,
             [&] { convex_reduce_block(part, blocks, delta, mass); });
}

int rbf_main(char** a) {
  const int type = std::atoi(a[0]);
  const int64_t n = std::atoll(a[1]), m = std::atoll(a[2]), d = std::atoll(a[3]);
  const int64_t ldx = std::atoll(a[4]), ldy = std::atoll(a[5]);
  const bool sym = std::atoi(a[6]) != 0;
  const double sigma = std::atof(a[7]);
  const int offset = std::atoi(a[8]);
  const std::vector<char> xb = read_file(a[9]);
  const std::vector<char> yb = sym ? std::vector<char>() : read_file(a[10]);
  const int64_t mm = sym ? n : m;
  std::vector<float> out_buf(static_cast<size_t>(n * mm + offset), -1.0f);
  float* out = out_buf.data() + offset;
  const float scale = static_cast<float>(-0.5 / (sigma * sigma));
  if (type == 0) {
    auto x = exact_copy<float>(xb);
    auto y = sym ? nullptr : exact_copy<float>(yb);
    run_rbf<F32>(x.get(), y.get(), n, mm, d, ldx, ldy, sym, scale, out);
  } else {
    auto x = exact_copy<unsigned short>(xb);
    auto y = sym ? nullptr : exact_copy<unsigned short>(yb);
    if (type == 1) {
      run_rbf<F16>(x.get(), y.get(), n, mm, d, ldx, ldy, sym, scale, out);
    } else {
      run_rbf<BF16>(x.get(), y.get(), n, mm, d, ldx, ldy, sym, scale, out);
    }
  }
  write_file(a[11], out, static_cast<size_t>(n * mm));
  return 0;
}

void write_update(const char* path, const float* C_new, size_t total,
                  const std::vector<float>& delta, const std::vector<float>& mass) {
  std::vector<float> result(C_new, C_new + total);
  result.insert(result.end(), delta.begin(), delta.end());
  result.insert(result.end(), mass.begin(), mass.end());
  write_file(path, result.data(), result.size());
}

int convex_main(char** a) {
  const int64_t batch = std::atoll(a[0]), n = std::atoll(a[1]);
  const int offset = std::atoi(a[2]);
  auto K = exact_copy<float>(read_file(a[3]));
  auto C = exact_copy<float>(read_file(a[4]));
  const size_t total = static_cast<size_t>(batch * n * n);
  std::vector<float> out_buf(total + static_cast<size_t>(offset), -1.0f);
  float* C_new = out_buf.data() + offset;
  std::vector<float> delta(static_cast<size_t>(batch), -1.0f);
  std::vector<float> mass(static_cast<size_t>(batch), -1.0f);
  run_convex(K.get(), C.get(), batch, n, C_new, delta.data(), mass.data());
  write_update(a[5], C_new, total, delta, mass);
  return 0;
}

int epilogue_main(char** a) {
  const int64_t batch = std::atoll(a[0]), n = std::atoll(a[1]);
  const int offset = std::atoi(a[2]);
  const bool in_place = std::atoi(a[3]) != 0;
  auto K = exact_copy<float>(read_file(a[4]));
  auto C = exact_copy<float>(read_file(a[5]));
  auto KC = exact_copy<float>(read_file(a[6]));
  const size_t total = static_cast<size_t>(batch * n * n);
  std::vector<float> out_buf(total + static_cast<size_t>(offset), -1.0f);
  float* C_new = out_buf.data() + offset;
  const float* kc = KC.get();
  if (in_place) {
    std::memcpy(C_new, KC.get(), total * sizeof(float));
    kc = C_new;
  }
  std::vector<float> delta(static_cast<size_t>(batch), -1.0f);
  std::vector<float> mass(static_cast<size_t>(batch), -1.0f);
  run_epilogue(K.get(), C.get(), kc, batch, n, C_new, delta.data(), mass.data());
  write_update(a[7], C_new, total, delta, mass);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 14 && std::string(argv[1]) == "rbf") return rbf_main(argv + 2);
  if (argc == 8 && std::string(argv[1]) == "convex") return convex_main(argv + 2);
  if (argc == 10 && std::string(argv[1]) == "epilogue") return epilogue_main(argv + 2);
  std::fprintf(stderr, "usage: see the header of emulator.cpp\n");
  return 2;
}
