"""The CUDA kernels' own device code, run on the CPU (no GPU needed).

tests/csrc_emulator/ compiles csrc/rbf_kernel.cuh and csrc/convex_update.cuh (the code that
the __global__ kernels run) as plain C++, with one CPU thread per CUDA thread, a barrier per
block for __syncthreads() and per warp for the shuffles. It runs the kernels' only path (fp32
FMA, every precision, every architecture) with the tile loaders, the bounds checks, the fused
epilogues, the symmetric mirroring, the convex update's element-wise pass (the default path
after cuBLAS's K C) and the two-kernel reductions:

* under AddressSanitizer + UBSan: any read or write outside the inputs / outputs fails, on
  shapes that are not multiples of the tiles (1, 5, 7, 129, 257, 769 ...), strided rows and
  misaligned outputs; the results are compared with the float64 reference;
* under ThreadSanitizer: a missing or misplaced __syncthreads() (shared-memory race) fails;
* NaN inputs give NaN outputs in the same places as the torch backend.

cuBLAS and the launches themselves cannot run here; tests/test_cuda_ops.py covers them on a
GPU (`make gpu-check`). Skipped when no C++20 compiler with the sanitizers is available.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kcm_cuda import reference

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_DIR = ROOT / "tests" / "csrc_emulator"
EPS32 = 2.0**-24
TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "tsan": ["-fsanitize=thread"],
}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _build(kind: str, out_dir: Path) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found")
    exe = out_dir / f"emulator_{kind}"
    flags = [
        "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-pthread",
        "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
    ]  # fmt: skip
    probe = out_dir / f"probe_{kind}.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); return 0; }\n")
    ok = subprocess.run(
        [cxx, *flags, *SANITIZERS[kind], str(probe), "-o", str(out_dir / f"probe_{kind}")],
        capture_output=True,
        text=True,
    )
    if ok.returncode != 0:
        pytest.skip(f"{cxx} cannot build C++20 with {kind}: {ok.stderr[-500:]}")
    proc = subprocess.run(
        [cxx, *flags, *SANITIZERS[kind], f"-I{ROOT / 'csrc'}",
         str(EMULATOR_DIR / "emulator.cpp"), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return exe


@pytest.fixture(scope="module")
def asan(tmp_path_factory) -> Path:
    return _build("asan", tmp_path_factory.mktemp("emu_asan"))


@pytest.fixture(scope="module")
def tsan(tmp_path_factory) -> Path:
    return _build("tsan", tmp_path_factory.mktemp("emu_tsan"))


def _run(exe: Path, args: list[str]) -> None:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{exe.name} {' '.join(args)}\n{proc.stderr[-6000:]}"


def _dump(t: torch.Tensor, path: Path) -> int:
    """Write the storage span of a (rows, d) view with unit column stride; return its ld."""
    rows, d = t.shape
    assert t.stride(1) == 1 or d == 1
    ld = t.stride(0)
    flat = torch.as_strided(t, ((rows - 1) * ld + d,), (1,)).contiguous()
    if t.dtype != torch.float32:
        flat = flat.view(torch.int16)
    flat.numpy().tofile(path)
    return ld


def emu_rbf(exe, tmp: Path, x, y, sigma=1.0, offset=0) -> torch.Tensor:
    n, d = x.shape
    m = n if y is None else y.shape[0]
    ldx = _dump(x, tmp / "x.bin")
    ldy = ldx if y is None else _dump(y, tmp / "y.bin")
    args = [
        "rbf", str(TYPE_CODES[x.dtype]), str(n), str(m), str(d), str(ldx), str(ldy),
        str(int(y is None)), repr(float(sigma)), str(offset),
        str(tmp / "x.bin"), str(tmp / "y.bin"), str(tmp / "out.bin"),
    ]  # fmt: skip
    _run(exe, args)
    return torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.float32)).reshape(n, m)


def _read_update(path: Path, batch: int, n: int):
    out = torch.from_numpy(np.fromfile(path, dtype=np.float32))
    total = batch * n * n
    return out[:total].reshape(batch, n, n), out[total : total + batch], out[total + batch :]


def emu_convex(exe, tmp: Path, K, C, offset=0):
    """The fused tiled kernel (KCM_CUDA_CONVEX=fused)."""
    batch, n, _ = K.shape
    K.numpy().tofile(tmp / "k.bin")
    C.numpy().tofile(tmp / "c.bin")
    args = ["convex", str(batch), str(n), str(offset)]
    _run(exe, [*args, str(tmp / "k.bin"), str(tmp / "c.bin"), str(tmp / "o.bin")])
    return _read_update(tmp / "o.bin", batch, n)


def emu_epilogue(exe, tmp: Path, K, C, KC, offset=0, in_place=True):
    """The default path's element-wise pass, given KC (cuBLAS's product on a GPU)."""
    batch, n, _ = K.shape
    for t, name in ((K, "k"), (C, "c"), (KC, "kc")):
        t.contiguous().numpy().tofile(tmp / f"{name}.bin")
    args = ["epilogue", str(batch), str(n), str(offset), str(int(in_place))]
    files = [str(tmp / f"{name}.bin") for name in ("k", "c", "kc")]
    _run(exe, [*args, *files, str(tmp / "o.bin")])
    return _read_update(tmp / "o.bin", batch, n)


def _points(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype)


def check_rbf(K, x, y, sigma=1.0) -> None:
    """First-order float32 error bound of the expansion (as in tests/test_parity.py)."""
    ref = reference.rbf_kernel(x, y, sigma)
    x64 = x.double()
    y64 = x64 if y is None else y.double()
    S = (x64 * x64).sum(1)[:, None] + (y64 * y64).sum(1)[None, :]
    S += 2.0 * (x64.abs() @ y64.abs().T)
    tol = ref * torch.expm1((x.shape[1] + 4) * EPS32 * S / (2 * sigma**2)) + 8 * EPS32 * ref
    err = (K.double() - ref).abs()
    assert bool((err <= tol + 1e-30).all()), f"max error {float(err.max()):.3e}"
    if y is None:
        assert torch.equal(K, K.T), "y=None must be exactly symmetric"
        assert bool((K.diagonal() == 1.0).all()), "y=None must have an exact unit diagonal"


RBF_CASES = [
    # (n, m or None, d, dtype, row stride of x or 0 (contiguous), output offset)
    (1, 1, 1, torch.float32, 0, 0),
    (1, None, 1, torch.float32, 0, 0),
    (7, 5, 3, torch.float32, 0, 1),
    (130, 129, 17, torch.float16, 0, 0),
    (129, None, 33, torch.float32, 40, 0),
    (300, 257, 40, torch.bfloat16, 0, 0),
    (257, None, 16, torch.float32, 0, 0),
    (200, 128, 769, torch.float32, 800, 0),
    (200, 128, 20, torch.float32, 0, 1),
]


@pytest.mark.parametrize("n,m,d,dtype,ld,offset", RBF_CASES)
def test_rbf_emulated(asan, tmp_path, n, m, d, dtype, ld, offset):
    x = _points(n, d, seed=n + d, dtype=dtype)
    if ld:
        x = torch.cat([x, torch.zeros(n, ld - d, dtype=dtype)], 1)[:, :d]
        assert x.stride(0) == ld
    y = None if m is None else _points(m, d, seed=m + 2 * d, dtype=dtype)
    K = emu_rbf(asan, tmp_path, x, y, sigma=0.9, offset=offset)
    check_rbf(K, x, y, sigma=0.9)


def _stack(batch: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(batch, n, 8, generator=g) / 2.0
    K = torch.exp(-torch.cdist(pts.double(), pts.double()) ** 2 / 2.0).float()
    C = torch.rand(batch, n, n, generator=g)
    C = torch.where(torch.rand(batch, n, n, generator=g) < 0.3, 0.0, C)
    C[0, :, n // 2] = 0.0  # a zero column: K C == 0 there
    return K.contiguous(), C.contiguous()


def check_convex(C_new, delta, mass, K, C) -> None:
    ref_C, ref_delta, ref_mass = reference.convex_update(K, C)
    n = K.shape[-1]
    tol_C = ref_C * ((n + 2) * EPS32 / 2 + 4 * EPS32) + 1e-30
    err = (C_new.double() - ref_C).abs()
    assert bool((err <= tol_C).all()), f"C_new max error {float(err.max()):.3e}"
    assert bool((C_new[0, :, n // 2] == 0).all())
    tol_delta = tol_C.sum((-2, -1)) + 4 * n * EPS32 * ref_delta + 1e-30
    assert bool(((delta.double() - ref_delta).abs() <= tol_delta).all()), (delta, ref_delta)
    assert bool(((mass.double() - ref_mass).abs() <= 4 * n * EPS32 * ref_mass).all())


@pytest.mark.parametrize(
    "batch,n,offset", [(1, 1, 0), (2, 5, 0), (1, 128, 0), (1, 128, 1), (2, 129, 0), (1, 257, 0)]
)
def test_convex_update_emulated(asan, tmp_path, batch, n, offset):
    K, C = _stack(batch, n, seed=batch * 1000 + n)
    C_new, delta, mass = emu_convex(asan, tmp_path, K, C, offset=offset)
    check_convex(C_new, delta, mass, K, C)


def test_convex_update_emulated_deterministic(asan, tmp_path):
    K, C = _stack(2, 131, seed=5)
    first = emu_convex(asan, tmp_path, K, C)
    second = emu_convex(asan, tmp_path, K, C)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_shared_memory_races(tsan, tmp_path):
    """ThreadSanitizer over the tiled main loop (several K steps), the symmetric early exit,
    the epilogues and both block reductions."""
    x = _points(130, 40, seed=2)
    y = _points(129, 40, seed=3)
    check_rbf(emu_rbf(tsan, tmp_path, x, y), x, y)
    check_rbf(emu_rbf(tsan, tmp_path, x, None), x, None)
    K, C = _stack(2, 130, seed=4)
    check_convex(*emu_convex(tsan, tmp_path, K, C), K, C)
    check_convex(*emu_epilogue(tsan, tmp_path, K, C, _product(K, C)), K, C)


# ---------------------------------------------------------------- default convex path


def _product(K: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """K C correctly rounded to float32 (what a good SGEMM returns, up to a few ulps)."""
    return (K.double() @ C.double()).float()


def _ieee_formula(K, C, KC):
    """The update's element-wise formula in float32 numpy (correctly rounded div, sqrt, mul;
    torch's vectorised CPU sqrt is not always correctly rounded)."""
    k, c, kc = K.numpy(), C.numpy(), KC.numpy()
    zero = kc <= 0
    out = c * np.sqrt(k / np.where(zero, np.float32(1.0), kc))
    return torch.from_numpy(np.where(zero, np.float32(0.0), out).astype(np.float32))


@pytest.mark.parametrize(
    "batch,n,offset,in_place",
    [(1, 1, 0, True), (2, 5, 0, True), (3, 6, 0, False), (1, 128, 1, True), (2, 129, 0, True),
     (1, 300, 0, False), (2, 64, 0, True)],
)  # fmt: skip
def test_convex_epilogue_emulated(asan, tmp_path, batch, n, offset, in_place):
    K, C = _stack(batch, n, seed=batch * 7 + n)
    KC = _product(K, C)
    C_new, delta, mass = emu_epilogue(asan, tmp_path, K, C, KC, offset, in_place)
    check_convex(C_new, delta, mass, K, C)
    # Given the same KC, every element is exactly the float32 formula (IEEE div/sqrt/mul).
    assert torch.equal(C_new, _ieee_formula(K, C, KC))
    assert torch.allclose(mass.double(), C.double().abs().sum((1, 2)), rtol=1e-6)


def test_convex_epilogue_many_blocks_deterministic(asan, tmp_path):
    """n = 700: 490,000 elements per entry, 120 blocks of the element-wise pass, each thread
    looping: same bits in place and out of place, and on a second run."""
    K, C = _stack(1, 700, seed=11)
    KC = _product(K, C)
    first = emu_epilogue(asan, tmp_path, K, C, KC, in_place=True)
    second = emu_epilogue(asan, tmp_path, K, C, KC, in_place=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    check_convex(*first, K, C)


# ---------------------------------------------------------------- NaN behaviour


def test_nan_propagates_like_the_torch_backend(asan, tmp_path):
    """The public API rejects NaN (kcm_cuda.validation); the raw ops must still not hide it:
    NaN input gives NaN where the torch backend gives NaN (not K = 1, not C_new = 0)."""
    from kcm_cuda.kernels import torch_backend

    x = _points(20, 8, seed=3)
    x[4, 2] = float("nan")
    K = emu_rbf(asan, tmp_path, x, None)
    ref = torch_backend.rbf_kernel(x, None, 1.0, "ieee")
    assert torch.equal(torch.isnan(K), torch.isnan(ref)) and bool(torch.isnan(K[4, 0]))
    diag = K.diagonal()
    assert bool(torch.isnan(diag[4])) and bool((diag[torch.arange(20) != 4] == 1.0).all())
    y = _points(9, 8, seed=4)
    K = emu_rbf(asan, tmp_path, x, y)
    assert torch.equal(torch.isnan(K), torch.isnan(torch_backend.rbf_kernel(x, y, 1.0, "ieee")))

    Kc, C = _stack(2, 12, seed=6)
    C[1, 3, 5] = float("nan")
    KC = _product(Kc, C)
    C_new, delta, mass = emu_epilogue(asan, tmp_path, Kc, C, KC)
    ref_C, ref_delta, ref_mass = torch_backend.convex_update(Kc, C, "ieee")
    assert torch.equal(torch.isnan(C_new), torch.isnan(ref_C)) and bool(torch.isnan(C_new).any())
    assert torch.equal(torch.isnan(delta), torch.isnan(ref_delta)) and bool(torch.isnan(delta[1]))
    assert torch.equal(torch.isnan(mass), torch.isnan(ref_mass))
    C_fused, delta_fused, _ = emu_convex(asan, tmp_path, Kc, C)
    assert torch.equal(torch.isnan(C_fused), torch.isnan(ref_C))
    assert torch.equal(torch.isnan(delta_fused), torch.isnan(ref_delta))
