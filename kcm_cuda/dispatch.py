"""Which backend runs an op: ``cuda`` (compiled extension) → ``triton`` → ``torch``.

``reference`` (float64 on the CPU) is never picked by "auto"; it is the tests' truth.
A new backend plugs in by adding its name to ``BACKENDS``, an availability rule to
``_is_available`` and its module path to ``_MODULES``; the module implements
``rbf_kernel(x, y, sigma, precision)`` and ``convex_update(K, C, precision)`` (see
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "torch", "reference")
AUTO_ORDER = ("cuda", "triton", "torch")

_MODULES = {
    "cuda": "kcm_cuda.kernels.cuda",
    "triton": "kcm_cuda.kernels.triton",
    "torch": "kcm_cuda.kernels.torch_backend",
    "reference": "kcm_cuda.kernels.reference_backend",
}


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _importable(name: str) -> bool:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return False
    is_available = getattr(module, "is_available", None)
    return bool(is_available()) if is_available is not None else True


def _is_available(name: str, device: torch.device | None) -> bool:
    """Whether ``name`` can run on tensors on ``device`` (None: on some device here)."""
    if name in ("torch", "reference"):
        return True
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if name == "cuda":
        return on_cuda and _importable("cuda")
    if name == "triton":
        return (on_cuda or triton_interpreter_enabled()) and _importable("triton")
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends usable here (for tensors on ``device`` when given), fastest first."""
    dev = torch.device(device) if device is not None else None
    return [name for name in BACKENDS if _is_available(name, dev)]


def resolve_backend(name: object, device: torch.device) -> str:
    """Turn a ``backend=`` argument into a concrete backend name for tensors on ``device``."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in AUTO_ORDER:
            # Triton on CPU tensors only runs in the (slow) interpreter: never chosen by "auto".
            if candidate == "triton" and device.type != "cuda":
                continue
            if _is_available(candidate, device):
                return candidate
        return "torch"
    if not _is_available(name, device):
        raise ValueError(_unavailable_reason(name, device))
    return name


def _unavailable_reason(name: str, device: torch.device) -> str:
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        return (
            "backend 'cuda' is not available: the compiled extension kcm_cuda._C is not "
            "installed (reinstall with a CUDA-enabled torch and a CUDA toolkit: "
            "pip install --no-build-isolation .)"
        )
    if not _importable("triton"):
        return "backend 'triton' is not available: the triton package is not installed"
    return (
        f"backend 'triton' needs CUDA tensors (got tensors on {device}) or the Triton "
        "interpreter (set TRITON_INTERPRET=1 before importing triton)"
    )


def backend_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])
