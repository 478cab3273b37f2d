"""Parity of every available backend with the float64 reference (kcm_cuda.reference).

Parametrised over kcm_cuda.dispatch.available_backends() for the CPU (and for CUDA when a GPU
is present), so it covers "torch" everywhere, "triton" under TRITON_INTERPRET=1 (set by
conftest) or on a GPU, and "cuda" when the extension is built. The backend modules are called
directly with the backend interface (inputs already valid); one test goes through the public
ops to check that the dispatch reaches each backend.

Tolerances are first-order error bounds, computed per element from the inputs, not a single
magic number (eps = 2^-24, the float32 unit roundoff):

rbf_kernel. K is evaluated as exp(-(|x|^2 + |y|^2 - 2 x.y)/(2 s^2)): the three terms are
    summed in float32 and cancel, so the error of the squared distance is relative to
    S_ij = |x_i|^2 + |y_j|^2 + 2 sum_k |x_ik y_jk|, not to the distance itself. With
    recursive/blocked float32 sums of d terms (norms and dot, Higham's gamma_d) and a product
    error u_p per term (0 for "ieee"; <= 2^-9 for "tf32", the 10-bit mantissa truncated or
    rounded on both inputs; <= 3*2^-20 < 2^-18 for the 3-pass "tf32x3"):
        |d(d2)| <= (u_p + (d + 4) eps) S_ij =: delta_ij (2 s^2)
        |K - K_ref| <= K_ref * expm1(delta_ij) + 8 eps K_ref (exp2 and scaling) + 1e-30.
    float16 / bfloat16 inputs are compared with the reference computed on the same (rounded)
    values; their products are exact in float32 and in TF32, so u_p = 0 for every precision.
    For centred data with distances ~ sigma this is ~1e-5 relative; offset data (|x|^2 >> d2)
    shows the expansion's inherent cancellation error and the bound grows with S.

convex_update. KC = sum_k K_ik C_kj has only non-negative terms, so its computed value has a
    relative error <= u_p + (n + 2) eps; C_new = C sqrt(K / KC) then has a relative error
    <= (u_p + (n + 2) eps)/2 + 4 eps (halved by the sqrt, plus div/sqrt/mul roundings).
    delta = sum |C_new - C|: the sum of the per-element bounds plus a summation error
    4 n eps * delta (n^2 terms; tree or cascade sums, ~sqrt(#terms) eps); mass = sum|C|:
    4 n eps relative. Entries where K C == 0 must be exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from kcm_cuda import reference
from kcm_cuda.dispatch import available_backends, backend_module

EPS32 = 2.0**-24
PRODUCT_ERROR = {"ieee": 0.0, "tf32x3": 2.0**-18, "tf32": 2.0**-9}
PRECISIONS = tuple(PRODUCT_ERROR)


def _backend_params() -> list:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for device in devices:
        for name in available_backends(device):
            if name != "reference":
                params.append(pytest.param(name, device, id=f"{name}-{device}"))
    return params


BACKENDS = _backend_params()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_points(n: int, d: int, sigma: float, seed: int, offset: float = 0.0) -> torch.Tensor:
    """Points whose pairwise distances are ~ sigma (K spread over (0, 1)), shifted by offset."""
    scale = sigma / math.sqrt(d) if d > 1 else sigma
    return torch.randn(n, d, generator=_gen(seed)) * scale + offset


# ----------------------------------------------------------------------------------- rbf
def rbf_tolerance(
    x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str, ref: torch.Tensor
) -> torch.Tensor:
    x64 = x.detach().cpu().double()
    y64 = x64 if y is None else y.detach().cpu().double()
    half = x.dtype != torch.float32 and (y is None or y.dtype != torch.float32)
    u_p = 0.0 if half else PRODUCT_ERROR[precision]
    d = x64.shape[1]
    s = (x64 * x64).sum(1)[:, None] + (y64 * y64).sum(1)[None, :] + 2 * (x64.abs() @ y64.abs().T)
    delta = (u_p + (d + 4) * EPS32) * s / (2.0 * sigma**2)
    return ref * torch.expm1(delta) + 8 * EPS32 * ref + 1e-30


def check_rbf(backend: str, x, y, sigma: float, precision: str = "ieee") -> float:
    """Run one backend, compare with the reference, return the max abs error."""
    K = backend_module(backend).rbf_kernel(x, y, sigma, precision)
    n = x.shape[0]
    m = n if y is None else y.shape[0]
    assert K.shape == (n, m)
    assert K.dtype == torch.float32
    assert K.device == x.device
    ref = reference.rbf_kernel(x, y, sigma)
    tol = rbf_tolerance(x, y, sigma, precision, ref)
    err = (K.detach().cpu().double() - ref).abs()
    worst = int(torch.argmax(err - tol))
    i, j = divmod(worst, m)
    assert bool((err <= tol).all()), (
        f"{backend}/{precision}: |K - K_ref| = {float(err[i, j]):.3e} > tol {float(tol[i, j]):.3e}"
        f" at ({i}, {j}); max abs error {float(err.max()):.3e}"
    )
    if y is None:
        assert torch.equal(K, K.T), "K(x, None) must be exactly symmetric"
        assert bool((K.diagonal() == 1.0).all()), "K(x, None) must have an exact unit diagonal"
    return float(err.max())


SIZES = (1, 7, 64, 300)
DIMS = (1, 3, 97, 769)
# Every (n, m) pair, with d cycling through DIMS so that each d meets several shapes.
RECT_CASES = [(n, m, DIMS[(i + j) % 4]) for i, n in enumerate(SIZES) for j, m in enumerate(SIZES)]
SYM_CASES = [(n, d) for n in SIZES for d in DIMS]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,m,d", RECT_CASES)
def test_rbf_shapes(backend, device, n, m, d):
    x = make_points(n, d, 1.0, seed=n * 1000 + d).to(device)
    y = make_points(m, d, 1.0, seed=m * 1000 + d + 1).to(device)
    check_rbf(backend, x, y, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,d", SYM_CASES)
def test_rbf_symmetric_shapes(backend, device, n, d):
    x = make_points(n, d, 1.0, seed=7 * n + d).to(device)
    check_rbf(backend, x, None, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["y=None", "y"])
def test_rbf_dtypes_precisions(backend, device, dtype, precision, symmetric):
    x = make_points(70, 97, 1.0, seed=1).to(device, dtype)
    y = None if symmetric else make_points(37, 97, 1.0, seed=2).to(device, dtype)
    check_rbf(backend, x, y, 1.0, precision)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("offset", [0.0, 2.0], ids=["centred", "offset"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["y=None", "y"])
def test_rbf_sigma(backend, device, sigma, offset, symmetric):
    x = make_points(45, 50, sigma, seed=3, offset=offset).to(device)
    y = None if symmetric else make_points(33, 50, sigma, seed=4, offset=offset).to(device)
    check_rbf(backend, x, y, sigma)


def _noncontiguous_views(device, dtype):
    """(name, x view, y view) with transposed, strided and zero-stride layouts."""
    base = make_points(90, 80, 1.0, seed=5).to(device, dtype)
    base_t = base.T.contiguous()
    x_t = base_t.T[:40]  # (40, 80), strides (1, 90)
    y_strided = base[::2, ::1][:35]  # row stride 160
    x_cols = base[:40, ::2]  # (40, 40), column stride 2
    y_cols = base[50:85, 1::2]  # (35, 40)
    x_rep = base[:1].expand(6, 80)  # zero row stride: six identical points
    return [
        ("transposed/strided", x_t, y_strided),
        ("column-strided", x_cols, y_cols),
        ("expanded", x_rep, base[:5]),
    ]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [0, 1, 2], ids=["transposed", "column-strided", "expanded"])
def test_rbf_noncontiguous(backend, device, dtype, case):
    _, x, y = _noncontiguous_views(device, dtype)[case]
    assert not x.is_contiguous()
    check_rbf(backend, x, y, 1.0)
    check_rbf(backend, x, None, 1.0)
    check_rbf(backend, y, x, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["y=None", "y"])
def test_rbf_float32_accuracy_typical(backend, device, precision, symmetric):
    """The per-element bounds above are worst-case (gamma_d ~ d eps) and loose for d = 769.
    On centred data with distances ~ sigma, "ieee" and "tf32x3" must also be float32-accurate
    in absolute terms: max |K - K_ref| <= 2e-6 (about 1e-7 is typical; a "tf32" product,
    ~5e-5 here, must not pass for either mode)."""
    x = make_points(300, 769, 1.0, seed=16).to(device)
    y = None if symmetric else make_points(64, 769, 1.0, seed=17).to(device)
    assert check_rbf(backend, x, y, 1.0, precision) <= 2e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rbf_duplicates_hit_clamp(backend, device):
    """Duplicate points: d2 ~ 0 computed as tiny negatives must clamp to 0 (K = 1, not > 1)."""
    x = make_points(20, 33, 1.0, seed=6, offset=3.0)
    x = torch.cat([x, x[:10], x[5:15]]).to(device)
    K = backend_module(backend).rbf_kernel(x, x, 1.0, "ieee")
    assert float(K.max()) <= 1.0
    check_rbf(backend, x, x.clone(), 1.0)
    check_rbf(backend, x, None, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rbf_half_inputs_with_large_norms(backend, device):
    """fp16 values whose squared norms overflow fp16 (> 65504): norms must be fp32."""
    x = (make_points(30, 97, 1.0, seed=8) + 200.0).to(device, torch.float16)
    y = (make_points(20, 97, 1.0, seed=9) + 200.0).to(device, torch.float16)
    check_rbf(backend, x, y, 30.0)
    check_rbf(backend, x, None, 30.0)


# --------------------------------------------------------------------------- convex_update
def make_stack(batch: int, n: int, seed: int, zero_fraction: float = 0.3):
    """K: symmetric RBF matrices (diag 1) of random points; C: non-negative with exact zeros."""
    g = _gen(seed)
    Ks = []
    for b in range(batch):
        pts = torch.randn(n, 16, generator=g) * (0.5 + 0.5 * b) / 4.0
        Ks.append(reference.rbf_kernel(pts, None, 1.0))
    K = torch.stack(Ks).float().contiguous()
    C = torch.rand(batch, n, n, generator=g)
    C = torch.where(torch.rand(batch, n, n, generator=g) < zero_fraction, 0.0, C)
    return K, C.contiguous()


def check_update(
    backend: str,
    K: torch.Tensor,
    C: torch.Tensor,
    precision: str = "ieee",
    *,
    transposed: bool = False,
    config: dict | None = None,
):
    """The backend's update against the float64 reference. ``transposed``: run the backend's
    D = C^T form (``convex_update_transposed``, K symmetric) on C^T and compare its result,
    transposed back, with the reference's C update: the two forms are the same step."""
    module = backend_module(backend)
    kwargs = {} if config is None else {"config": config}
    if transposed:
        D_new, delta, mass = module.convex_update_transposed(
            K, C.mT.contiguous(), precision, **kwargs
        )
        C_new = D_new.mT
    else:
        C_new, delta, mass = module.convex_update(K, C, precision, **kwargs)
    batch, n, _ = K.shape
    assert C_new.shape == (batch, n, n) and C_new.dtype == torch.float32
    assert delta.shape == (batch,) and mass.shape == (batch,)
    assert delta.dtype == torch.float32 and mass.dtype == torch.float32
    ref_C, ref_delta, ref_mass = reference.convex_update(K, C)
    rel_kc = PRODUCT_ERROR[precision] + (n + 2) * EPS32
    tol_C = ref_C * (0.5 * rel_kc + 4 * EPS32) + 1e-30
    got_C = C_new.detach().cpu().double()
    err_C = (got_C - ref_C).abs()
    assert bool((err_C <= tol_C).all()), (
        f"{backend}/{precision}: C_new max err {float(err_C.max()):.3e}, "
        f"max err/tol {float((err_C / tol_C).max()):.2f}"
    )
    KC = K.double() @ C.double()
    assert bool((got_C[KC == 0] == 0).all()), "C_new must be exactly 0 where K C == 0"
    sum_rel = 4 * n * EPS32
    tol_delta = tol_C.sum((-2, -1)) + sum_rel * ref_delta + 1e-30
    err_delta = (delta.cpu().double() - ref_delta).abs()
    assert bool((err_delta <= tol_delta).all()), f"delta {delta} vs {ref_delta}"
    err_mass = (mass.cpu().double() - ref_mass).abs()
    assert bool((err_mass <= sum_rel * ref_mass + 1e-30).all()), f"mass {mass} vs {ref_mass}"
    return float(err_C.max()), float(err_delta.max()), float(err_mass.max())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 64, 130])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_convex_update(backend, device, batch, n, precision):
    K, C = make_stack(batch, n, seed=10 * n + batch)
    check_update(backend, K.to(device), C.to(device), precision)


TRANSPOSED_BACKENDS = [
    p for p in BACKENDS if hasattr(backend_module(p.values[0]), "convex_update_transposed")
]


@pytest.mark.parametrize("backend,device", TRANSPOSED_BACKENDS)
@pytest.mark.parametrize("batch,n", [(1, 1), (2, 37), (1, 70)])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_convex_update_transposed_is_the_same_step(backend, device, batch, n, precision):
    """D <- D * sqrt(K / (D K)) on D = C^T equals C <- C * sqrt(K / (K C)) transposed, for the
    exactly symmetric K of the solver, within the float32 bounds of the plain update."""
    K, C = make_stack(batch, n, seed=7 * n + batch)
    assert torch.equal(K, K.mT)
    check_update(backend, K.to(device), C.to(device), precision, transposed=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_convex_update_first_step(backend, device):
    """The solver's first step from C0 = 1/n (no zeros in C)."""
    K, _ = make_stack(2, 50, seed=11)
    C = torch.full_like(K, 1.0 / 50)
    check_update(backend, K.to(device), C.to(device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_convex_update_zero_column_and_sparse_K(backend, device):
    """A zero column of C makes K C == 0 there (C_new must be exactly 0, no NaN); a small
    sigma gives a K with exact zeros (underflow) off the diagonal."""
    K, C = make_stack(2, 40, seed=12)
    C[0, :, 3] = 0.0
    C[1, :, 39] = 0.0
    pts = torch.randn(40, 8, generator=_gen(13)) * 3.0
    K[1] = reference.rbf_kernel(pts, None, 0.2).float()
    assert bool((K[1] == 0).any())
    C_new, delta, mass = backend_module(backend).convex_update(K.to(device), C.to(device), "ieee")
    assert bool(torch.isfinite(C_new).all())
    assert bool((C_new[0, :, 3] == 0).all()) and bool((C_new[1, :, 39] == 0).all())
    check_update(backend, K.to(device), C.to(device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_convex_update_deterministic(backend, device):
    K, C = make_stack(3, 70, seed=14)
    K, C = K.to(device), C.to(device)
    first = backend_module(backend).convex_update(K, C, "ieee")
    second = backend_module(backend).convex_update(K, C, "ieee")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_public_ops_reach_backend(backend, device):
    """Through the public layer (validation + dispatch) with backend=<name>."""
    import kcm_cuda

    x = make_points(20, 9, 1.0, seed=15).to(device, torch.float16)
    K = kcm_cuda.rbf_kernel(x, sigma=1.0, backend=backend)
    ref = reference.rbf_kernel(x, None, 1.0)
    assert K.device == x.device
    assert float((K.cpu().double() - ref).abs().max()) < 1e-5
    C = torch.full((20, 20), 1.0 / 20, device=device)
    C_new, delta, mass = kcm_cuda.convex_update(K, C, backend=backend)
    ref_C, ref_delta, ref_mass = reference.convex_update(K, C)
    assert C_new.shape == (20, 20) and delta.dim() == 0 and mass.dim() == 0
    assert float((C_new.cpu().double() - ref_C).abs().max()) < 1e-6
    assert abs(float(delta) - float(ref_delta)) <= 1e-5 * float(ref_delta) + 1e-6
    assert abs(float(mass) - float(ref_mass)) <= 1e-5 * float(ref_mass)
