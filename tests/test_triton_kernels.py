"""Triton-specific tests: tile boundaries and grouped program order under forced small tile
configurations, the symmetric-store scheme, the batched grid, strided inputs, the partial-sum
buffer, the autotuned path (GPU only) and the interpreter's documented behaviour.

Runs on CUDA tensors when a GPU is present, else on CPU tensors in the Triton interpreter
(TRITON_INTERPRET=1, set by conftest before triton is imported); skipped when neither works.
Error bounds: see tests/test_parity.py (same helpers).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_parity import check_rbf, check_update, make_points, make_stack, rbf_tolerance

from kcm_cuda import reference
from kcm_cuda.dispatch import available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if "triton" not in available_backends(DEVICE):
    pytest.skip("triton backend not available here", allow_module_level=True)

tb = importlib.import_module("kcm_cuda.kernels.triton")
rbf_mod = importlib.import_module("kcm_cuda.kernels.triton.rbf_kernel")
cu_mod = importlib.import_module("kcm_cuda.kernels.triton.convex_update")
INTERPRETED = rbf_mod.INTERPRETED

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
RECT = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3}


def _rbf(x, y, sigma=1.0, precision="ieee", config=None):
    return rbf_mod.rbf_kernel(x, y, sigma, precision, config=config)


def _check_rbf_config(x, y, config, sigma=1.0):
    K = _rbf(x, y, sigma, config=config)
    ref = reference.rbf_kernel(x, y, sigma)
    tol = rbf_tolerance(x, y, sigma, "ieee", ref)
    assert bool(((K.cpu().double() - ref).abs() <= tol).all())
    if y is None:
        assert torch.equal(K, K.T)
        assert bool((K.diagonal() == 1.0).all())
    return K


def test_module_exposes_backend_interface():
    assert callable(tb.rbf_kernel) and callable(tb.convex_update)
    assert rbf_mod.INTERPRETED == cu_mod.INTERPRETED
    if DEVICE == "cpu":
        assert INTERPRETED, "on the CPU the triton backend only runs in the interpreter"


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("d", [1, 15, 16, 17, 40])
def test_rbf_tile_boundaries(n, d):
    """Sizes just below, at and above the 16-wide tiles, in n (rows and columns) and in d."""
    x = make_points(n, d, 1.0, seed=n * 100 + d).to(DEVICE)
    y = make_points(max(1, n - 1), d, 1.0, seed=n * 100 + d + 1).to(DEVICE)
    _check_rbf_config(x, None, SMALL)
    _check_rbf_config(x, y, SMALL)
    _check_rbf_config(x, y, RECT)


def test_rbf_grouped_order_covers_every_tile():
    """7 x 7 tiles with GROUP_M = 2 and 3 (a last, partial group): every entry is written
    (the output starts as torch.empty, so a missed tile would show as garbage or NaN)."""
    x = make_points(100, 20, 1.0, seed=1).to(DEVICE)
    y = make_points(110, 20, 1.0, seed=2).to(DEVICE)
    for group in (1, 2, 3, 8):
        cfg = dict(SMALL, GROUP_M=group)
        _check_rbf_config(x, None, cfg)
        _check_rbf_config(x, y, cfg)


def test_rbf_symmetric_scheme_is_bitwise_mirror_of_upper_triangle():
    """y=None: only tiles pid_m <= pid_n are computed; the lower triangle is their mirror, so
    K(x, None) equals the upper triangle of K(x, x) (same tiles, same arithmetic) mirrored."""
    x = make_points(50, 30, 1.0, seed=3).to(DEVICE)
    K_sym = _rbf(x, None, config=SMALL)
    K_full = _rbf(x, x, config=SMALL)
    upper = torch.triu(K_full, 1)
    expected = upper + upper.T
    expected.diagonal().fill_(1.0)
    assert torch.equal(K_sym, expected)


def test_rbf_symmetric_needs_square_tiles():
    x = make_points(10, 4, 1.0, seed=4).to(DEVICE)
    with pytest.raises(ValueError, match="BLOCK_M == BLOCK_N"):
        _rbf(x, None, config=RECT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rbf_strided_inputs_match_contiguous(dtype):
    """Strides are passed to the kernel (no copy): a transposed view, a column-strided view
    and a zero-stride (expanded) view give the result of their contiguous copies."""
    base = make_points(60, 48, 1.0, seed=5).to(DEVICE, dtype)
    views = [
        base.T.contiguous().T[:37],  # strides (1, 60)
        base[::3, ::2],  # (20, 24), strides (144, 2)
        base[:1].expand(9, 48),  # stride (0, 1)
    ]
    ys = [base[40:], base[1::3, 1::2], base[10:12]]
    for x, y in zip(views, ys, strict=True):
        assert not x.is_contiguous()
        for yy in (None, y):
            got = _rbf(x, yy, config=SMALL)
            want = _rbf(x.contiguous(), None if yy is None else yy.contiguous(), config=SMALL)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            check_rbf("triton", x, yy, 1.0)


def test_row_sqnorms_float32_from_any_dtype_and_strides():
    base = (make_points(70, 300, 1.0, seed=6) * 30.0).to(DEVICE)
    for x in (base, base.half(), base.bfloat16(), base.T.contiguous().T, base[::2, ::3]):
        got = rbf_mod.row_sqnorms(x)
        assert got.dtype == torch.float32
        want = (x.cpu().double() ** 2).sum(1)
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-6, atol=0)
    # fp16 values whose squares overflow fp16: the norms are float32.
    big = torch.full((3, 40), 250.0, device=DEVICE, dtype=torch.float16)
    assert torch.equal(rbf_mod.row_sqnorms(big).cpu(), torch.full((3,), 40 * 62500.0))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("config", [SMALL, RECT], ids=["16x16", "32x16"])
def test_convex_update_tile_boundaries(n, config):
    K, C = make_stack(2, n, seed=n)
    K, C = K.to(DEVICE), C.to(DEVICE)
    got = cu_mod.convex_update(K, C, "ieee", config=config)
    default = tb.convex_update(K, C, "ieee")
    for a, b in zip(got, default, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    check_update("triton", K, C)


def test_convex_update_batched_grid_equals_per_layer():
    """The batch is a grid axis: each layer of a stack gives exactly its single-layer result,
    and permuting the stack permutes the outputs."""
    K, C = make_stack(4, 45, seed=7)
    K, C = K.to(DEVICE), C.to(DEVICE)
    C_new, delta, mass = cu_mod.convex_update(K, C, "ieee", config=SMALL)
    for b in range(4):
        c1, d1, m1 = cu_mod.convex_update(K[b : b + 1], C[b : b + 1], "ieee", config=SMALL)
        assert torch.equal(c1[0], C_new[b])
        assert torch.equal(d1[0], delta[b]) and torch.equal(m1[0], mass[b])
    perm = torch.tensor([2, 0, 3, 1], device=DEVICE)
    Cp, dp, mp = cu_mod.convex_update(K[perm], C[perm], "ieee", config=SMALL)
    assert torch.equal(Cp, C_new[perm]) and torch.equal(dp, delta[perm])
    assert torch.equal(mp, mass[perm])


def test_convex_update_partials_match_outputs():
    """delta and mass from the fused partial sums equal sums over the returned C_new / C."""
    K, C = make_stack(3, 70, seed=8)
    K, C = K.to(DEVICE), C.to(DEVICE)
    for config in (SMALL, RECT, None):
        C_new, delta, mass = cu_mod.convex_update(K, C, "ieee", config=config)
        want_delta = (C_new.double() - C.double()).abs().sum((1, 2))
        want_mass = C.double().abs().sum((1, 2))
        torch.testing.assert_close(delta.double(), want_delta, rtol=1e-5, atol=0)
        torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=0)


def test_convex_update_strided_stack():
    """The kernel takes strides: a transposed view of C (a non-contiguous stack)."""
    K, C = make_stack(2, 33, seed=9)
    K, C = K.to(DEVICE), C.to(DEVICE)
    Ct = C.transpose(1, 2)
    got = cu_mod.convex_update(K, Ct, "ieee", config=SMALL)
    want = cu_mod.convex_update(K, Ct.contiguous(), "ieee", config=SMALL)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert got[0].is_contiguous()


@pytest.mark.skipif(not INTERPRETED, reason="documents the Triton interpreter's behaviour")
def test_interpreter_ignores_input_precision():
    """Under TRITON_INTERPRET=1, tl.dot is a NumPy float32 matmul: "tf32" and "tf32x3" give
    bit-for-bit the "ieee" result (so the TF32 error of these modes is not exercised here)."""
    x = make_points(40, 50, 1.0, seed=10) + 1.0
    ieee = _rbf(x, None, precision="ieee")
    for precision in ("tf32", "tf32x3"):
        assert torch.equal(_rbf(x, None, precision=precision), ieee)
    K, C = make_stack(1, 40, seed=11)
    a = cu_mod.convex_update(K, C, "ieee")
    b = cu_mod.convex_update(K, C, "tf32")
    assert torch.equal(a[0], b[0])


@pytest.mark.skipif(INTERPRETED, reason="autotuning runs on a GPU only")
def test_autotuned_paths():
    """Default (autotuned) launches on a GPU, with shapes that retune: the partials buffer must
    stay exact whichever config wins (reset_to_zero + a slot per program of any config)."""
    for n in (33, 300, 1000):
        x = make_points(n, 97, 1.0, seed=n).to(DEVICE)
        check_rbf("triton", x, None, 1.0)
        check_rbf("triton", x, x[: n // 2 + 1] + 0.01, 1.0)
        K, C = make_stack(2, n, seed=n)
        check_update("triton", K.to(DEVICE), C.to(DEVICE))


@pytest.mark.skipif(INTERPRETED, reason="TF32 tensor cores exist only on a GPU")
def test_gpu_tf32_modes_order_of_error():
    """On a GPU: "tf32" is measurably less accurate than "tf32x3" and "ieee" on fp32 input."""
    x = make_points(256, 512, 1.0, seed=12).to(DEVICE) + 0.5
    ref = reference.rbf_kernel(x, None, 1.0)
    err = {
        p: float((_rbf(x, None, precision=p).cpu().double() - ref).abs().max())
        for p in ("ieee", "tf32x3", "tf32")
    }
    assert err["tf32"] > err["tf32x3"] and err["tf32"] > err["ieee"]


# ------------------------------------------------- persistent symmetric RBF (triangular list)
import triton  # noqa: E402  (after the module-level skip)
import triton.language as tl  # noqa: E402


@triton.jit
def _triangular_probe(out_ptr, T, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    i, j = rbf_mod.triangular_tile(t)
    tl.store(out_ptr + 2 * t, i, mask=t < T)
    tl.store(out_ptr + 2 * t + 1, j, mask=t < T)


@pytest.mark.parametrize("nt", [1, 2, 3, 7, 48, 90])
def test_triangular_tile_list_covers_the_upper_triangle_once(nt):
    """t -> (i, j) enumerates every tile with i <= j exactly once (48: n = 3072 at 64-wide
    tiles), in column order, so the persistent grid neither skips nor repeats a tile."""
    T = nt * (nt + 1) // 2
    out = torch.full((2 * T,), -1, dtype=torch.int32, device=DEVICE)
    _triangular_probe[(1,)](out, T, BLOCK=triton.next_power_of_2(T))
    pairs = [tuple(p) for p in out.view(T, 2).tolist()]
    expected = [(i, j) for j in range(nt) for i in range(j + 1)]
    assert pairs == expected


@pytest.mark.parametrize("n", [1, 16, 17, 50, 81])
@pytest.mark.parametrize("ctas", [1, 2])
def test_persistent_symmetric_rbf(n, ctas):
    """Grids smaller than the tile list (several rounds per program under the interpreter's
    3 'SMs') and larger; exact symmetry, unit diagonal, float32 parity."""
    x = make_points(n, 9, 1.0, seed=n + ctas)
    config = {**SMALL, "CTAS_PER_SM": ctas}
    nt = -(-n // 16)
    programs = rbf_mod.symmetric_grid_size(n, 16, ctas, torch.device(DEVICE))
    assert 1 <= programs <= nt * (nt + 1) // 2
    _check_rbf_config(x.to(DEVICE), None, config)


def test_symmetric_grid_never_launches_lower_triangle_programs():
    dev = torch.device("cpu")  # sm_count: 3 under the interpreter
    assert rbf_mod.symmetric_grid_size(16, 16, 4, dev) == 1  # one tile, not 12 programs
    assert rbf_mod.symmetric_grid_size(64, 16, 1, dev) == 3  # 10 tiles, 3 resident
    assert rbf_mod.symmetric_grid_size(64, 16, 8, dev) == 10


@pytest.mark.parametrize("symmetric", [True, False])
def test_rbf_nan_point_propagates(symmetric):
    """The kernel never turns a NaN point into K = 1 (max(d2, 0) propagates NaN); the row and
    column of that point are NaN, the rest is untouched."""
    x = make_points(20, 5, 1.0, seed=3)
    x[4, 2] = float("nan")
    y = None if symmetric else make_points(9, 5, 1.0, seed=4)
    K = _rbf(x.to(DEVICE), None if y is None else y.to(DEVICE), config=SMALL).cpu()
    assert bool(K[4].isnan().all())
    if symmetric:
        assert bool(K[:, 4].isnan().all())
    rest = torch.cat([K[:4], K[5:]])
    if symmetric:
        rest = torch.cat([rest[:, :4], rest[:, 5:]], dim=1)
    assert not bool(rest.isnan().any())


# ------------------------------------------------------------------- transposed update
@pytest.mark.parametrize("batch,n", [(1, 16), (2, 33)])
@pytest.mark.parametrize("config", [SMALL, RECT], ids=["small", "rect"])
def test_transposed_update_tile_configs(batch, n, config):
    K, C = make_stack(batch, n, seed=n)
    check_update("triton", K.to(DEVICE), C.to(DEVICE), transposed=True, config=config)


def test_transposed_update_strided_D():
    """D given as a transposed view (no copy): the kernel reads it with its own strides."""
    K, C = make_stack(2, 24, seed=5)
    K, C = K.to(DEVICE), C.to(DEVICE)
    D_new, delta, mass = cu_mod.convex_update_transposed(K, C.mT, "ieee", config=SMALL)
    ref_C, ref_delta, _ = reference.convex_update(K, C)
    torch.testing.assert_close(D_new.mT.cpu().double(), ref_C, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta.cpu().double(), ref_delta, rtol=1e-5, atol=1e-6)


def test_solver_uses_the_transposed_update_for_symmetric_K(monkeypatch):
    """kcm_coefficients on the triton backend iterates on D = C^T when K is exactly symmetric
    (and on C otherwise) and matches the float64 reference solve either way."""
    import kcm_cuda

    calls = {"plain": 0, "transposed": 0}
    plain, transposed = tb.convex_update, tb.convex_update_transposed

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tb, "convex_update", count("plain", plain))
    monkeypatch.setattr(tb, "convex_update_transposed", count("transposed", transposed))
    K, _ = make_stack(2, 20, seed=8)
    C, n_iter = kcm_cuda.kcm_coefficients(K.to(DEVICE), backend="triton")
    C_ref, it_ref = reference.kcm_coefficients(K)
    assert calls["plain"] == 0 and calls["transposed"] == int(n_iter.max())
    assert n_iter.tolist() == it_ref.tolist()
    torch.testing.assert_close(C.cpu().double(), C_ref, rtol=1e-4, atol=1e-6)

    K_asym = K.clone()
    K_asym[:, 0, 1] *= 0.5  # no longer symmetric: the D form would be a different problem
    calls.update(plain=0, transposed=0)
    C, n_iter = kcm_cuda.kcm_coefficients(K_asym.to(DEVICE), backend="triton")
    C_ref, it_ref = reference.kcm_coefficients(K_asym)
    assert calls["transposed"] == 0 and calls["plain"] == int(n_iter.max())
    torch.testing.assert_close(C.cpu().double(), C_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- device guard
def test_device_guard_selects_the_tensors_device():
    from kcm_cuda.kernels.triton import _common

    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.parametrize("op", ["rbf", "rbf_xy", "update", "update_t"])
def test_every_launch_runs_under_the_device_guard(monkeypatch, op):
    """Each Triton entry point enters the guard with its tensors' device before launching
    (the launch itself checks the guard is active, so a launch outside it fails)."""
    import contextlib

    active: list[torch.device] = []
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for mod in (rbf_mod, cu_mod):
        monkeypatch.setattr(mod, "device_guard", recording_guard)
        for name in ("_launch", "_row_sqnorms"):
            if hasattr(mod, name):
                inner = getattr(mod, name)

                def checked(*args, _inner=inner, **kwargs):
                    assert active, "Triton launched outside the device guard"
                    return _inner(*args, **kwargs)

                monkeypatch.setattr(mod, name, checked)
    x = make_points(10, 4, 1.0, seed=1).to(DEVICE)
    K, C = make_stack(1, 10, seed=1)
    K, C = K.to(DEVICE), C.to(DEVICE)
    if op == "rbf":
        rbf_mod.rbf_kernel(x, None, 1.0, "ieee")
    elif op == "rbf_xy":
        rbf_mod.rbf_kernel(x, x[:3], 1.0, "ieee")
    elif op == "update":
        cu_mod.convex_update(K, C, "ieee")
    else:
        cu_mod.convex_update_transposed(K, C, "ieee")
    assert entered and all(d == torch.device(DEVICE) for d in entered)
