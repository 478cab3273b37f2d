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
