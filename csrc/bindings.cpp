// torch glue of the kcm CUDA kernels: argument checks, output allocation, the current stream,
// and the operator registrations
//   kcm::rbf_kernel(Tensor x, Tensor? y, float sigma, str precision) -> Tensor
//   kcm::convex_update(Tensor K, Tensor C, str precision) -> (Tensor, Tensor, Tensor)
// The schemas are defined here (TORCH_LIBRARY) when this extension loads; without it,
// kcm_cuda/kernels/cuda.py defines the same schemas from Python. Only the CUDA kernels are
// registered here; the CPU kernels and the fake (meta) implementations come from cuda.py.
//
// Strides: rbf_kernel reads x and y in place when their column stride is 1 (any row stride,
// including row slices and expanded rows); other layouts are copied with .contiguous().
// convex_update takes K and C as given when contiguous, else copies them with .contiguous().
//
// convex_update: KC = K C by cuBLAS (at::bmm; TF32 tensor cores for "tf32" only, fp32 SGEMM
// for "ieee" and "tf32x3"), written into C_new's buffer, then one fused element-wise +
// reduction pass (launch_convex_epilogue). KCM_CUDA_CONVEX=fused selects the single tiled FMA
// kernel instead (launch_convex_update_fused, fp32 for every precision).
// rbf_kernel: the tiled fp32 FMA kernel for every precision (at least as accurate as TF32;
// "auto" dispatch sends tf32 on sm_80+ to the Triton backend).
//
// The string arguments are taken as std::string: the kernel signatures that torch >= 2.4's
// TORCH_LIBRARY accepts for "str" (std::string_view only from much newer torch).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "kcm_kernels.h"

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

kcm::Precision parse_precision(const std::string& precision, const char* op) {
  if (precision == "ieee") return kcm::Precision::kIeee;
  if (precision == "tf32") return kcm::Precision::kTf32;
  if (precision == "tf32x3") return kcm::Precision::kTf32x3;
  TORCH_CHECK_VALUE(false, op, ": precision must be one of 'ieee', 'tf32x3', 'tf32', got '",
                    precision, "'");
  return kcm::Precision::kIeee;  // unreachable
}

kcm::InputType input_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kcm::InputType::kFloat32;
    case at::kHalf:
      return kcm::InputType::kFloat16;
    case at::kBFloat16:
      return kcm::InputType::kBFloat16;
    default:
      TORCH_CHECK(false, "unreachable: unsupported dtype ", t.scalar_type());
  }
  return kcm::InputType::kFloat32;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A (rows, d) matrix the RBF kernels can read in place: unit column stride, and every element
// offset that the 128-row tiles form fits in 32 bits (see KMajorTile in gemm_tile.cuh).
at::Tensor readable_points(const at::Tensor& t) {
  const int64_t rows = t.size(0);
  const int64_t d = t.size(1);
  const auto fits = [&](const at::Tensor& u) {
    const int64_t tile_rows = std::min<int64_t>(rows, kcm::kTile);
    return u.stride(0) >= 0 && (tile_rows * u.stride(0) + d) < kIntMax;
  };
  if ((t.stride(1) == 1 || d == 1) && fits(t)) return t;
  at::Tensor c = t.contiguous();
  TORCH_CHECK_VALUE(fits(c), "kcm::rbf_kernel: too many features (d = ", d, ")");
  return c;
}

void check_points(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "kcm::rbf_kernel: ", name,
                    " must be 2-D (rows, features), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16,
                   "kcm::rbf_kernel: ", name,
                   " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda(), "kcm::rbf_kernel: ", name,
                    " must be a CUDA tensor, got device ", t.device());
}

at::Tensor rbf_kernel_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                           double sigma, std::string precision_name) {
  constexpr const char* op = "kcm::rbf_kernel";
  check_points(x_in, "x");
  const bool symmetric = !y_in.has_value();
  if (!symmetric) {
    check_points(*y_in, "y");
    TORCH_CHECK_VALUE(y_in->device() == x_in.device(), op,
                      ": x and y must be on the same device, got ", x_in.device(), " and ",
                      y_in->device());
    TORCH_CHECK_VALUE(y_in->size(1) == x_in.size(1), op,
                      ": x and y must have the same number of features, got x: ",
                      x_in.sizes(), " and y: ", y_in->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0.0, op,
                    ": sigma must be a finite number > 0, got ", sigma);
  parse_precision(precision_name, op);  // validated; every precision runs the fp32 FMA kernel

  const int64_t n = x_in.size(0);
  const int64_t m = symmetric ? n : y_in->size(0);
  const int64_t d = x_in.size(1);
  TORCH_CHECK_VALUE(n <= kcm::kMaxRowsPerGrid, op, ": x has too many rows (", n, " > ",
                    kcm::kMaxRowsPerGrid, ")");
  TORCH_CHECK_VALUE(m <= kIntMax - kcm::kTile, op, ": y has too many rows (", m, ")");
  TORCH_CHECK_VALUE(d <= kIntMax, op, ": too many features (d = ", d, ")");

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({n, m}, x_in.options().dtype(at::kFloat));
  if (n == 0 || m == 0) return out;

  // One element type for both operands: mixed dtypes are read as float32.
  at::Tensor x = x_in;
  at::Tensor y = symmetric ? x_in : *y_in;
  if (!symmetric && x.scalar_type() != y.scalar_type()) {
    x = x.to(at::kFloat);
    y = y.to(at::kFloat);
  }
  x = readable_points(x);
  y = symmetric ? x : readable_points(y);
  const kcm::InputType type = input_type(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  at::Tensor x_sq = at::empty({n}, x.options().dtype(at::kFloat));
  check_launch(kcm::launch_row_sqnorms(x.data_ptr(), type, n, d, x.stride(0),
                                       x_sq.data_ptr<float>(), stream),
               op);
  at::Tensor y_sq = x_sq;
  if (!symmetric) {
    y_sq = at::empty({m}, x.options().dtype(at::kFloat));
    check_launch(kcm::launch_row_sqnorms(y.data_ptr(), type, m, d, y.stride(0),
                                         y_sq.data_ptr<float>(), stream),
                 op);
  }
  const float scale = static_cast<float>(-0.5 / (sigma * sigma));
  check_launch(kcm::launch_rbf_kernel(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), type,
                                      n, m, d, x_sq.data_ptr<float>(), y_sq.data_ptr<float>(),
                                      scale, symmetric, out.data_ptr<float>(), stream),
               op);
  return out;
}

// Pins cuBLAS's TF32 switch for the products in its scope and restores the caller's
// float32 matmul precision ("highest" / "high" / "medium") after. It flips global state only
// when the setting differs (the default, TF32 off, is never touched for "ieee").
class CublasTf32Scope {
 public:
  explicit CublasTf32Scope(bool allow) {
    auto& ctx = at::globalContext();
    if (ctx.allowTF32CuBLAS() == allow) return;
    switch (ctx.float32MatmulPrecision()) {
      case at::Float32MatmulPrecision::HIGHEST:
        previous_ = "highest";
        break;
      case at::Float32MatmulPrecision::HIGH:
        previous_ = "high";
        break;
      case at::Float32MatmulPrecision::MEDIUM:
        previous_ = "medium";
        break;
    }
    ctx.setAllowTF32CuBLAS(allow);
  }
  ~CublasTf32Scope() {
    if (previous_ != nullptr) at::globalContext().setFloat32MatmulPrecision(previous_);
  }
  CublasTf32Scope(const CublasTf32Scope&) = delete;
  CublasTf32Scope& operator=(const CublasTf32Scope&) = delete;

 private:
  const char* previous_ = nullptr;
};

// KCM_CUDA_CONVEX: "cublas" (default) or "fused"; anything else is an error.
bool use_fused_convex_kernel() {
  const char* v = std::getenv("KCM_CUDA_CONVEX");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "cublas") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "fused") == 0,
                    "KCM_CUDA_CONVEX must be 'cublas' or 'fused', got '", v, "'");
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convex_update_cuda(const at::Tensor& K_in,
                                                                  const at::Tensor& C_in,
                                                                  std::string precision_name) {
  constexpr const char* op = "kcm::convex_update";
  TORCH_CHECK_VALUE(K_in.dim() == 3 && K_in.size(1) == K_in.size(2), op,
                    ": K must be a stack (B, n, n) of square matrices, got shape ", K_in.sizes());
  TORCH_CHECK_VALUE(C_in.sizes() == K_in.sizes(), op, ": C must have the shape of K ",
                    K_in.sizes(), ", got ", C_in.sizes());
  TORCH_CHECK_TYPE(K_in.scalar_type() == at::kFloat && C_in.scalar_type() == at::kFloat, op,
                   ": K and C must be float32, got ", K_in.scalar_type(), " and ",
                   C_in.scalar_type());
  TORCH_CHECK_VALUE(K_in.is_cuda() && C_in.device() == K_in.device(), op,
                    ": K and C must be CUDA tensors on the same device, got ", K_in.device(),
                    " and ", C_in.device());
  const kcm::Precision precision = parse_precision(precision_name, op);

  const int64_t batch = K_in.size(0);
  const int64_t n = K_in.size(1);
  TORCH_CHECK_VALUE(batch <= 65535, op, ": at most 65535 matrices per call, got ", batch);
  TORCH_CHECK_VALUE(n <= kcm::kMaxRowsPerGrid, op, ": n too large (", n, ")");
  const bool fused = use_fused_convex_kernel();

  const c10::cuda::CUDAGuard guard(K_in.device());
  const at::Tensor K = K_in.contiguous();
  const at::Tensor C = C_in.contiguous();
  at::Tensor C_new = at::empty({batch, n, n}, K.options());
  at::Tensor delta = at::empty({batch}, K.options());
  at::Tensor mass = at::empty({batch}, K.options());
  if (batch == 0) return {C_new, delta, mass};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(K.device().index()).stream();

  if (fused) {
    at::Tensor workspace =
        at::empty({std::max<int64_t>(kcm::convex_update_workspace_floats(batch, n), 1)},
                  K.options());
    check_launch(kcm::launch_convex_update_fused(K.data_ptr<float>(), C.data_ptr<float>(), batch,
                                                 n, C_new.data_ptr<float>(),
                                                 workspace.data_ptr<float>(),
                                                 delta.data_ptr<float>(), mass.data_ptr<float>(),
                                                 stream),
                 op);
    return {C_new, delta, mass};
  }
  if (n > 0) {  // KC = K C into C_new's buffer (on the current stream, like the kernels)
    const CublasTf32Scope tf32(precision == kcm::Precision::kTf32);
    at::bmm_out(C_new, K, C);
  }
  at::Tensor workspace =
      at::empty({std::max<int64_t>(kcm::convex_epilogue_workspace_floats(batch, n), 1)},
                K.options());
  float* kc = C_new.data_ptr<float>();  // updated in place
  check_launch(kcm::launch_convex_epilogue(K.data_ptr<float>(), C.data_ptr<float>(), kc, batch, n,
                                           kc, workspace.data_ptr<float>(),
                                           delta.data_ptr<float>(), mass.data_ptr<float>(),
                                           stream),
               op);
  return {C_new, delta, mass};
}

}  // namespace

TORCH_LIBRARY(kcm, m) {
  // The fake (meta) implementations are registered from Python by this module; torch requires
  // C++-defined operators to name it (torch.library.register_fake checks it).
  m.set_python_module("kcm_cuda.kernels.cuda");
  m.def("rbf_kernel(Tensor x, Tensor? y, float sigma, str precision) -> Tensor");
  m.def("convex_update(Tensor K, Tensor C, str precision) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kcm, CUDA, m) {
  m.impl("rbf_kernel", &rbf_kernel_cuda);
  m.impl("convex_update", &convex_update_cuda);
}

// `import kcm_cuda._C` runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                   nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
