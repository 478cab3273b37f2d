"""The ``cuda`` backend: the compiled extension ``kcm_cuda._C`` behind two torch operators.

    kcm::rbf_kernel(Tensor x, Tensor? y, float sigma, str precision) -> Tensor
    kcm::convex_update(Tensor K, Tensor C, str precision) -> (Tensor, Tensor, Tensor)

The schemas are defined exactly once, whichever side loads:

* with the extension, ``import kcm_cuda._C`` defines them (``TORCH_LIBRARY(kcm, m)`` in
  csrc/bindings.cpp) and registers the CUDA kernels;
* without it (CPU-only installs, CI), this module defines the same schemas with
  ``torch.library``, so that the operators, their fake implementations and
  ``torch.library.opcheck`` work and are tested everywhere.

What the CUDA kernels compute (csrc/bindings.cpp):

* ``rbf_kernel``: the tiled fp32 FMA kernel for every precision ("tf32" / "tf32x3" are at
  least as accurate as asked; on sm_80+ the ``auto`` dispatch sends them to the Triton
  backend's tensor-core kernels, see :mod:`kcm_cuda.dispatch`);
* ``convex_update``: K C by cuBLAS (``torch.bmm``: fp32 SGEMM for "ieee" and "tf32x3", TF32
  tensor cores for "tf32", the caller's TF32 setting restored after), then one fused
  element-wise + reduction kernel (deterministic two-stage sums, no atomics).
  ``KCM_CUDA_CONVEX=fused`` runs the single tiled fp32 FMA kernel with the update in its
  epilogue instead (an alternative for GPUs where it beats cuBLAS; ``make gpu-check``
  measures both paths' correctness).
* NaN inputs give NaN outputs where the torch backend gives them (the public API rejects
  NaN before any kernel runs).

In both cases this module registers the CPU kernels (built on
:mod:`kcm_cuda.kernels.torch_backend`) and the fake implementations (shape inference for
``torch.compile`` / FakeTensor). The backend functions called by :mod:`kcm_cuda.dispatch` are
:func:`rbf_kernel` and :func:`convex_update`; :func:`is_available` says whether the compiled
CUDA kernels can run here.
"""

from __future__ import annotations

import torch

from kcm_cuda.kernels import torch_backend

NAMESPACE = "kcm"
SCHEMAS = {
    "rbf_kernel": "rbf_kernel(Tensor x, Tensor? y, float sigma, str precision) -> Tensor",
    "convex_update": (
        "convex_update(Tensor K, Tensor C, str precision) -> (Tensor, Tensor, Tensor)"
    ),
}
PRECISIONS = ("ieee", "tf32x3", "tf32")

try:  # defines the kcm:: schemas and registers the CUDA kernels
    from kcm_cuda import _C  # type: ignore[attr-defined]  # noqa: F401

    EXTENSION_ERROR: str | None = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    """Whether the compiled extension kcm_cuda._C was imported."""
    return _C is not None


def is_available() -> bool:
    """Whether the compiled CUDA kernels can run here (extension built and a GPU visible)."""
    return _C is not None and torch.cuda.is_available()


def _op_defined(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


# Python-side schema definitions, only for the operators the extension did not define.
_DEF_LIB: torch.library.Library | None = None
_missing = [name for name in SCHEMAS if not _op_defined(name)]
if _missing:
    _DEF_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    for _name in _missing:
        _DEF_LIB.define(SCHEMAS[_name])
_SCHEMA_SOURCE = "python" if _missing else "extension"


def schema_source() -> str:
    """Who defined the kcm:: schemas: "extension" (csrc/bindings.cpp) or "python" (here)."""
    return _SCHEMA_SOURCE


def _check_precision(op: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"kcm::{op}: precision must be one of {PRECISIONS}, got {precision!r}")


# ---- CPU kernels (the torch backend; the CUDA kernels come from the extension) ----


def _rbf_kernel_cpu(
    x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str
) -> torch.Tensor:
    _check_precision("rbf_kernel", precision)
    if sigma <= 0:
        raise ValueError(f"kcm::rbf_kernel: sigma must be > 0, got {sigma!r}")
    return torch_backend.rbf_kernel(x, y, sigma, precision).contiguous()


def _convex_update_cpu(
    K: torch.Tensor, C: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_precision("convex_update", precision)
    if K.dim() != 3 or K.shape[1] != K.shape[2] or C.shape != K.shape:
        raise ValueError(
            "kcm::convex_update: K and C must be stacks (B, n, n) of the same shape, got "
            f"{tuple(K.shape)} and {tuple(C.shape)}"
        )
    C_new, delta, mass = torch_backend.convex_update(
        K.float().contiguous(), C.float().contiguous(), precision
    )
    return C_new.contiguous(), delta.contiguous(), mass.contiguous()


_IMPL_LIB = torch.library.Library(NAMESPACE, "IMPL")
_IMPL_LIB.impl("rbf_kernel", _rbf_kernel_cpu, "CPU")
_IMPL_LIB.impl("convex_update", _convex_update_cpu, "CPU")


# ---- fake implementations (shapes, dtypes, strides of the outputs) ----


@torch.library.register_fake(f"{NAMESPACE}::rbf_kernel", lib=_IMPL_LIB)
def _rbf_kernel_fake(
    x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str
) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: f"kcm::rbf_kernel: x must be 2-D, got {x.dim()}-D")
    if y is not None:
        torch._check(y.dim() == 2, lambda: f"kcm::rbf_kernel: y must be 2-D, got {y.dim()}-D")
        torch._check(
            y.shape[1] == x.shape[1],
            lambda: "kcm::rbf_kernel: x and y must have the same number of features",
        )
    m = x.shape[0] if y is None else y.shape[0]
    return x.new_empty((x.shape[0], m), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::convex_update", lib=_IMPL_LIB)
def _convex_update_fake(
    K: torch.Tensor, C: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(K.dim() == 3, lambda: f"kcm::convex_update: K must be 3-D, got {K.dim()}-D")
    torch._check(K.shape[1] == K.shape[2], lambda: "kcm::convex_update: K must be (B, n, n)")
    torch._check(C.shape == K.shape, lambda: "kcm::convex_update: C must have the shape of K")
    batch = K.shape[0]
    return (
        K.new_empty(K.shape, dtype=torch.float32),
        K.new_empty((batch,), dtype=torch.float32),
        K.new_empty((batch,), dtype=torch.float32),
    )


# ---- backend interface (arguments validated by kcm_cuda.validation) ----


def _require_extension(t: torch.Tensor) -> None:
    if t.is_cuda and _C is None:
        raise RuntimeError(
            "the cuda backend needs the compiled extension kcm_cuda._C, which is not "
            f"installed ({EXTENSION_ERROR}); reinstall with a CUDA-enabled torch and a CUDA "
            "toolkit (pip install --no-build-isolation .) or use backend='torch'"
        )


def rbf_kernel(
    x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str
) -> torch.Tensor:
    """float32 (n, m) RBF kernel matrix; y None → exactly symmetric, diagonal exactly 1."""
    _require_extension(x)
    return torch.ops.kcm.rbf_kernel(x, y, float(sigma), precision)


def convex_update(
    K: torch.Tensor, C: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, C float32 contiguous (B, n, n) → (C_new (B, n, n), delta (B,), mass (B,))."""
    _require_extension(K)
    C_new, delta, mass = torch.ops.kcm.convex_update(K, C, precision)
    return C_new, delta, mass
