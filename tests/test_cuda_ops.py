"""The kcm:: torch operators of the cuda backend (kcm_cuda/kernels/cuda.py, csrc/).

On every machine: the schemas, torch.library.opcheck (schema, fake implementation,
autograd registration, AOT dispatch) of both operators with their CPU kernels, and the CPU
kernels' results. Without the compiled extension the schemas come from Python; with it, from
csrc/bindings.cpp: the same tests run either way.

With a GPU and the extension: opcheck on CUDA tensors, exactness properties of the CUDA
kernels (symmetry, unit diagonal, zero where K C == 0, determinism), edge shapes against the
float64 reference, and parity at the sizes of real models (n = 3072, d = 768: BERT-base; n =
11008, d = 4096: a 7B LLaMA FFN) against float64 products on the GPU; both convex-update
paths (cuBLAS + fused element-wise pass, and KCM_CUDA_CONVEX=fused), the TF32 switch left as
the caller set it, NaN propagation, and tensors on a second GPU (device guard).

KCM_REQUIRE_GPU=1 (set by `make gpu-check`) turns the GPU tests' skip into a failure: on a
GPU machine they must run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kcm_cuda import reference
from kcm_cuda.kernels import cuda, torch_backend

PRECISIONS = ("ieee", "tf32x3", "tf32")
ON_GPU = cuda.is_available()
REQUIRE_GPU = os.environ.get("KCM_REQUIRE_GPU", "") == "1"


@pytest.fixture
def _gpu() -> None:
    if ON_GPU:
        return
    reason = "needs a CUDA GPU and the compiled extension kcm_cuda._C"
    detail = f" (torch.cuda.is_available()={torch.cuda.is_available()}, {cuda.EXTENSION_ERROR})"
    if REQUIRE_GPU:
        pytest.fail(f"KCM_REQUIRE_GPU=1 but this test {reason}{detail}")
    pytest.skip(reason)


needs_gpu = pytest.mark.usefixtures("_gpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def points(n: int, d: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Points with pairwise distances ~ 1 (kernel values spread over (0, 1))."""
    x = torch.randn(n, d, generator=_gen(seed)) / math.sqrt(max(d, 1))
    return x.to(device=device, dtype=dtype)


def stack(batch: int, n: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K: RBF matrices of random points; C: non-negative, about a third exact zeros."""
    g = _gen(seed)
    pts = torch.randn(batch, n, 8, generator=g) / 2.0
    K = torch.exp(-torch.cdist(pts.double(), pts.double()) ** 2 / 2.0).float()
    C = torch.rand(batch, n, n, generator=g)
    C = torch.where(torch.rand(batch, n, n, generator=g) < 0.3, 0.0, C)
    return K.to(device).contiguous(), C.to(device).contiguous()


# ------------------------------------------------------------------------ every machine


def test_schemas():
    assert str(torch.ops.kcm.rbf_kernel.default._schema) == "kcm::" + cuda.SCHEMAS["rbf_kernel"]
    assert (
        str(torch.ops.kcm.convex_update.default._schema)
        == "kcm::" + cuda.SCHEMAS["convex_update"]
    )
    expected_source = "extension" if cuda.extension_loaded() else "python"
    assert cuda.schema_source() == expected_source
    assert cuda.is_available() == (cuda.extension_loaded() and torch.cuda.is_available())


RBF_CPU_CASES = [
    # (n, m or None, d, dtype, precision)
    (7, None, 5, torch.float32, "ieee"),
    (7, 4, 5, torch.float32, "tf32"),
    (1, None, 1, torch.float32, "ieee"),
    (1, 3, 1, torch.float32, "tf32x3"),
    (9, None, 3, torch.float16, "tf32x3"),
    (6, 5, 4, torch.bfloat16, "ieee"),
]


@pytest.mark.parametrize("n,m,d,dtype,precision", RBF_CPU_CASES)
def test_opcheck_rbf_kernel_cpu(n, m, d, dtype, precision):
    x = points(n, d, seed=n + d, dtype=dtype)
    y = None if m is None else points(m, d, seed=m + 2 * d, dtype=dtype)
    torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x, y, 0.8, precision))


def test_opcheck_rbf_kernel_cpu_strided():
    base = points(12, 10, seed=3)
    x = base.T.contiguous().T[:7]  # column stride 12
    y = base[::2, 1:8]  # row stride 20
    torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x[:, :7], y, 1.0, "ieee"))
    torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x, None, 1.0, "ieee"))


@pytest.mark.parametrize("batch,n", [(1, 1), (1, 6), (3, 5)])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_opcheck_convex_update_cpu(batch, n, precision):
    K, C = stack(batch, n, seed=batch * 10 + n)
    torch.library.opcheck(torch.ops.kcm.convex_update.default, (K, C, precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cpu_kernels_are_the_torch_backend(precision):
    x = points(11, 6, seed=1)
    y = points(5, 6, seed=2)
    for other in (None, y):
        got = cuda.rbf_kernel(x, other, 1.3, precision)
        assert torch.equal(got, torch_backend.rbf_kernel(x, other, 1.3, precision))
    K, C = stack(2, 9, seed=4)
    for got, want in zip(
        cuda.convex_update(K, C, precision),
        torch_backend.convex_update(K, C, precision),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_cpu_kernel_rejects_bad_arguments():
    x = points(4, 3, seed=5)
    with pytest.raises(ValueError, match="precision"):
        torch.ops.kcm.rbf_kernel(x, None, 1.0, "fp64")
    with pytest.raises(ValueError, match="sigma"):
        torch.ops.kcm.rbf_kernel(x, None, 0.0, "ieee")
    K, C = stack(1, 4, seed=6)
    with pytest.raises(ValueError, match="precision"):
        torch.ops.kcm.convex_update(K, C, "half")
    with pytest.raises(ValueError, match="stacks"):
        torch.ops.kcm.convex_update(K[0], C[0], "ieee")


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(13, 4, dtype=torch.float16)
        y = torch.empty(6, 4, dtype=torch.float16)
        assert torch.ops.kcm.rbf_kernel(x, y, 1.0, "ieee").shape == (13, 6)
        K = torch.empty(3, 8, 8)
        C_new, delta, mass = torch.ops.kcm.convex_update(K, K, "tf32")
        assert C_new.shape == (3, 8, 8) and delta.shape == (3,) and mass.shape == (3,)
        assert C_new.dtype == delta.dtype == torch.float32


def test_cuda_tensors_without_extension_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda, "_C", None)

    class _FakeCudaTensor:
        is_cuda = True

    with pytest.raises(RuntimeError, match="kcm_cuda._C"):
        cuda.rbf_kernel(_FakeCudaTensor(), None, 1.0, "ieee")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ GPU only


EPS32 = 2.0**-24
# Error of one product of the dot product: none for "ieee"; TF32 rounding of both inputs.
PRODUCT_ERROR = {"ieee": 0.0, "tf32x3": 2.0**-18, "tf32": 2.0**-9}
TYPICAL_ATOL = {"ieee": 2e-5, "tf32x3": 2e-5}  # on points with distances ~ 1


def _assert_rbf_close(K, x, y, sigma: float, precision: str, what: str, ref=None) -> None:
    """|K - K_ref| within the first-order bound of the expansion |x|^2 + |y|^2 - 2 x.y in
    float32 (as in tests/test_parity.py), and for ieee / tf32x3 also within float32-typical
    absolute errors. The reference is float64, on K's device."""
    x64 = x.double()
    y64 = x64 if y is None else y.double()
    if ref is None:  # float64 expansion on the device: its own error (~1e-16 S) is negligible
        dist = (x64 * x64).sum(1)[:, None] + (y64 * y64).sum(1)[None, :] - 2.0 * (x64 @ y64.T)
        ref = torch.exp(-dist.clamp_min(0.0) / (2.0 * sigma**2))
        if y is None:
            ref.diagonal().fill_(1.0)
    half = x.dtype != torch.float32 and (y is None or y.dtype != torch.float32)
    u_p = 0.0 if half else PRODUCT_ERROR[precision]
    d = x.shape[1]
    S = (x64 * x64).sum(1)[:, None] + (y64 * y64).sum(1)[None, :]
    S += 2.0 * (x64.abs() @ y64.abs().T)
    tol = ref * torch.expm1((u_p + (d + 4) * EPS32) * S / (2.0 * sigma**2)) + 8 * EPS32 * ref
    err = (K.double() - ref).abs()
    excess = float((err - tol - 1e-30).max())
    assert excess <= 0, f"{what}/{precision}: error above the bound by {excess:.3e}"
    if precision in TYPICAL_ATOL:
        worst = float(err.max())
        assert worst <= TYPICAL_ATOL[precision], f"{what}/{precision}: max error {worst:.3e}"


@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_opcheck_cuda(precision):
    x = points(130, 33, seed=7, device="cuda")
    y = points(70, 33, seed=8, device="cuda", dtype=torch.float16).float()
    torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x, None, 1.0, precision))
    torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x, y, 1.0, precision))
    K, C = stack(2, 130, seed=9, device="cuda")
    torch.library.opcheck(torch.ops.kcm.convex_update.default, (K, C, precision))


EDGE_SIZES = [(1, 1, 1), (7, 7, 1), (1, 300, 7), (300, 1, 16), (129, 127, 17), (300, 769, 769)]


@needs_gpu
@pytest.mark.parametrize("n,m,d", EDGE_SIZES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rbf_edge_shapes(n, m, d, precision, dtype):
    x = points(n, d, seed=n + d, dtype=dtype, device="cuda")
    y = points(m, d, seed=m + 3 * d, dtype=dtype, device="cuda")
    K = cuda.rbf_kernel(x, y, 1.0, precision)
    assert K.shape == (n, m) and K.dtype == torch.float32 and K.is_contiguous()
    _assert_rbf_close(K, x, y, 1.0, precision, f"{n}x{m}x{d}")
    S = cuda.rbf_kernel(x, None, 1.0, precision)
    assert torch.equal(S, S.T), "y=None must give an exactly symmetric matrix"
    assert bool((S.diagonal() == 1.0).all()), "y=None must give an exact unit diagonal"
    _assert_rbf_close(S, x, None, 1.0, precision, f"{n}x{d} sym")


@needs_gpu
def test_rbf_strided_inputs():
    base = points(300, 160, seed=11, device="cuda")
    cases = [
        (base[:, ::2], base[100:200, 1::2]),  # column stride 2: copied
        (base[::3, 5:85], base[1::2, 5:85]),  # row strides 480 / 320, unit column stride
        (base.T.contiguous().T[:77], base[:9]),  # transposed layout
        (base[:1].expand(5, 160), base[:40]),  # zero row stride
    ]
    for x, y in cases:
        for other in (y, None):
            K = cuda.rbf_kernel(x, other, 0.9, "ieee")
            _assert_rbf_close(K, x, other, 0.9, "ieee", "strided")


@needs_gpu
def test_rbf_mixed_dtypes_and_sigma():
    x = points(50, 20, seed=12, device="cuda", dtype=torch.float16)
    y = points(40, 20, seed=13, device="cuda")
    for sigma in (0.3, 1.0, 4.0):
        K = cuda.rbf_kernel(x, y, sigma, "ieee")
        _assert_rbf_close(K, x, y, sigma, "ieee", f"sigma={sigma}")


@needs_gpu
def test_rbf_every_precision_is_the_fp32_kernel():
    """The WMMA path is retired: the CUDA RBF computes every precision in fp32 FMA."""
    x = points(256, 512, seed=14, device="cuda")
    ieee = cuda.rbf_kernel(x, None, 1.0, "ieee")
    for precision in ("tf32", "tf32x3"):
        assert torch.equal(ieee, cuda.rbf_kernel(x, None, 1.0, precision))


@needs_gpu
def test_rbf_nan_propagates():
    x = points(40, 16, seed=20, device="cuda")
    x[3, 5] = float("nan")
    K = torch.ops.kcm.rbf_kernel(x, None, 1.0, "ieee")
    want = torch_backend.rbf_kernel(x, None, 1.0, "ieee")
    assert torch.equal(torch.isnan(K), torch.isnan(want)) and bool(torch.isnan(K[3, 0]))
    assert bool(torch.isnan(K[3, 3])) and float(K[0, 0]) == 1.0


@needs_gpu
def test_ops_on_a_second_gpu():
    """The device guard: tensors on cuda:1 while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = points(70, 9, seed=21, device="cuda:1")
    K = cuda.rbf_kernel(x, None, 1.0, "ieee")
    assert K.device == x.device
    _assert_rbf_close(K, x, None, 1.0, "ieee", "cuda:1")
    Kc, C = stack(2, 33, seed=22, device="cuda:1")
    for mode in ("cublas", "fused"):
        os.environ["KCM_CUDA_CONVEX"] = mode
        try:
            C_new, delta, mass = cuda.convex_update(Kc, C, "ieee")
        finally:
            os.environ.pop("KCM_CUDA_CONVEX")
        assert C_new.device == Kc.device
        _check_update(Kc.cpu(), C.cpu(), "ieee", C_new, delta, mass)

@needs_gpu
@pytest.mark.parametrize("n,d", [(3072, 768), (11008, 4096)])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_rbf_parity_model_sizes(n, d, precision):
    x = points(n, d, seed=n, device="cuda")
    x64 = x.double()
    sq = (x64 * x64).sum(1)
    K = cuda.rbf_kernel(x, None, 1.0, precision)
    assert torch.equal(K, K.T) and bool((K.diagonal() == 1.0).all())
    ref = torch.exp(-(sq[:, None] + sq[None, :] - 2.0 * (x64 @ x64.T)).clamp_min(0.0) / 2.0)
    ref.diagonal().fill_(1.0)
    _assert_rbf_close(K, x, None, 1.0, precision, f"n={n}, d={d}", ref=ref)
    del K, ref
    y = points(n // 3 + 5, d, seed=n + 1, device="cuda")
    y64 = y.double()
    K = cuda.rbf_kernel(x, y, 1.0, precision)
    dist = sq[:, None] + (y64 * y64).sum(1)[None, :] - 2.0 * (x64 @ y64.T)
    ref = torch.exp(-dist.clamp_min(0.0) / 2.0)
    _assert_rbf_close(K, x, y, 1.0, precision, f"n={n}, d={d}, y", ref=ref)


def _check_update(K, C, precision, C_new, delta, mass, ref=None):
    ref_C, ref_delta, ref_mass = ref if ref is not None else reference.convex_update(K, C)
    rtol = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 5e-3}[precision]
    dev = C_new.device
    ref_C, ref_delta, ref_mass = ref_C.to(dev), ref_delta.to(dev), ref_mass.to(dev)
    err = (C_new.double() - ref_C).abs()
    assert bool((err <= rtol * ref_C + 1e-30).all()), (
        f"{precision}: C_new max relative error {float((err / ref_C.clamp_min(1e-30)).max()):.2e}"
    )
    assert torch.allclose(mass.double(), ref_mass, rtol=1e-5, atol=0)
    # delta = sum |C_new - C|: off by at most the sum of the C_new errors (+ summation).
    tol_delta = rtol * ref_C.sum((-2, -1)) + 1e-5 * ref_delta
    assert bool(((delta.double() - ref_delta).abs() <= tol_delta).all()), (delta, ref_delta)


@pytest.fixture(params=["cublas", "fused"])
def convex_path(request, monkeypatch):
    """Both CUDA convex-update paths (csrc/bindings.cpp reads KCM_CUDA_CONVEX per call)."""
    monkeypatch.setenv("KCM_CUDA_CONVEX", request.param)
    return request.param


@needs_gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_convex_update_edge_shapes(batch, n, precision, convex_path):
    K, C = stack(batch, n, seed=n * 7 + batch, device="cuda")
    C_new, delta, mass = cuda.convex_update(K, C, precision)
    assert C_new.shape == (batch, n, n) and delta.shape == (batch,) and mass.shape == (batch,)
    _check_update(K.cpu(), C.cpu(), precision, C_new, delta, mass)
    KC = K.double() @ C.double()
    assert bool((C_new[KC == 0] == 0).all()), "C_new must be exactly 0 where K C == 0"


@needs_gpu
def test_convex_update_path_switch_rejects_bad_values(monkeypatch):
    K, C = stack(1, 8, seed=23, device="cuda")
    monkeypatch.setenv("KCM_CUDA_CONVEX", "wmma")
    with pytest.raises(ValueError, match="KCM_CUDA_CONVEX"):
        torch.ops.kcm.convex_update(K, C, "ieee")


@needs_gpu
def test_convex_update_leaves_the_tf32_setting_alone():
    """"ieee" must not use TF32 even where the caller enabled it, and the op must leave the
    caller's setting (and float32 matmul precision) exactly as it found it."""
    x = points(1024, 16, seed=24, device="cuda")
    K = cuda.rbf_kernel(x, None, 1.0, "ieee")[None]
    C = torch.full_like(K, 1.0 / 1024)
    ref = reference.convex_update(K.cpu(), C.cpu())
    before = torch.get_float32_matmul_precision()
    try:
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            allow = torch.backends.cuda.matmul.allow_tf32
            got = cuda.convex_update(K, C, "ieee")
            _check_update(None, None, "ieee", *got, ref=ref)
            cuda.convex_update(K, C, "tf32")
            assert torch.get_float32_matmul_precision() == setting
            assert torch.backends.cuda.matmul.allow_tf32 == allow
    finally:
        torch.set_float32_matmul_precision(before)


@needs_gpu
def test_convex_update_nan_propagates(convex_path):
    K, C = stack(2, 40, seed=25, device="cuda")
    C[1, 7, 3] = float("nan")
    C_new, delta, mass = torch.ops.kcm.convex_update(K, C, "ieee")
    want = torch_backend.convex_update(K.cpu(), C.cpu(), "ieee")
    for got, ref in zip((C_new, delta, mass), want, strict=True):
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(ref))
    assert bool(torch.isnan(delta[1])) and not bool(torch.isnan(delta[0]))


@needs_gpu
def test_convex_update_zero_columns_unaligned_and_noncontiguous():
    K, C = stack(2, 131, seed=15, device="cuda")
    C[0, :, 7] = 0.0
    C[1, :, 130] = 0.0
    C_new, delta, mass = cuda.convex_update(K, C, "ieee")
    assert bool(torch.isfinite(C_new).all())
    assert bool((C_new[0, :, 7] == 0).all()) and bool((C_new[1, :, 130] == 0).all())
    _check_update(K.cpu(), C.cpu(), "ieee", C_new, delta, mass)
    # Through the op directly: a transposed (non-contiguous) C is copied by the binding.
    Ct = C.transpose(1, 2)
    got = torch.ops.kcm.convex_update(K, Ct, "ieee")
    want = cuda.convex_update(K, Ct.contiguous(), "ieee")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_convex_update_deterministic(precision, convex_path):
    K, C = stack(3, 260, seed=16, device="cuda")
    first = cuda.convex_update(K, C, precision)
    second = cuda.convex_update(K, C, precision)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("n", [3072, 11008])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_convex_update_parity_model_sizes(n, precision):
    x = points(n, 64, seed=n + 5, device="cuda")
    K = cuda.rbf_kernel(x, None, 1.0, "ieee")
    C = torch.rand(1, n, n, generator=torch.Generator(device="cuda").manual_seed(n), device="cuda")
    C = (C / n).contiguous()
    C_new, delta, mass = cuda.convex_update(K[None], C, precision)
    K64, C64 = K.double()[None], C.double()
    KC = K64 @ C64
    ref_C = torch.where(KC > 0, C64 * torch.sqrt(K64 / KC.clamp_min(1e-300)), 0.0)
    ref = (ref_C, (ref_C - C64).abs().sum((1, 2)), C64.abs().sum((1, 2)))
    del KC, K64
    _check_update(None, None, precision, C_new, delta, mass, ref=ref)
