"""Which backend runs an op: per op, precision and compute capability, from a table.

``auto`` on CUDA tensors walks the preference list of :data:`DISPATCH_TABLE` for the op
("rbf", "convex_update"), the precision and the device's compute capability, and takes the
first backend available there (and, when the backend module defines
``supports(op, precision, capability)``, willing to run that combination); CPU tensors get
``torch`` (the Triton interpreter is never chosen by auto), as do float64 points. The table's
rows are an engineering estimate until a GPU measures them: ``pytest benchmarks/bench_dispatch.py``
on a GPU times every backend per row and prints (and saves) the measured table; a table in
that JSON format replaces the built-in one through ``KCM_DISPATCH_TABLE=path``.

``reference`` (float64 on the CPU) is never picked by "auto"; it is the tests' truth.
A new backend plugs in by adding its name to ``BACKENDS``, an availability rule to
``_is_available`` and its module path to ``_MODULES``; the module implements
``rbf_kernel(x, y, sigma, precision)`` and ``convex_update(K, C, precision)`` (see
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "torch", "reference")
AUTO_ORDER = ("cuda", "triton", "torch")

OPS = ("rbf", "convex_update")
PRECISION_KEYS = ("ieee", "tf32x3", "tf32")

# (minimum compute capability, op, precision) -> preference order on CUDA tensors; the row
# with the highest minimum <= the device's capability applies. Estimates from the code review
# of the GPU goals, not yet measured on a GPU (bench_dispatch.py measures them):
#   sm_80+: tf32 / tf32x3 on Triton (tl.dot on TF32 tensor cores, persistent symmetric RBF,
#           D = C^T update); ieee on the hand-written CUDA FMA kernels / cuBLAS SGEMM update.
#   sm_75:  no TF32 tensor cores; CUDA first, Triton as the fallback.
#   sm_70:  CUDA or torch (Triton's support of sm_70 is not relied on).
_TF32_FIRST = ("triton", "cuda", "torch")
_CUDA_FIRST = ("cuda", "triton", "torch")
DISPATCH_TABLE: dict[tuple[int, str, str], tuple[str, ...]] = {}
for _op in OPS:
    for _p in PRECISION_KEYS:
        DISPATCH_TABLE[(80, _op, _p)] = _CUDA_FIRST if _p == "ieee" else _TF32_FIRST
        DISPATCH_TABLE[(75, _op, _p)] = _CUDA_FIRST
        DISPATCH_TABLE[(70, _op, _p)] = ("cuda", "torch")
        DISPATCH_TABLE[(0, _op, _p)] = ("torch",)


def table_to_json(table: dict[tuple[int, str, str], tuple[str, ...]]) -> list[dict]:
    return [
        {"min_capability": cc, "op": op, "precision": p, "order": list(order)}
        for (cc, op, p), order in sorted(table.items(), reverse=True)
    ]


def table_from_json(rows: list[dict]) -> dict[tuple[int, str, str], tuple[str, ...]]:
    """Parse a dispatch table file (the rows of :func:`table_to_json`), checking every name."""
    table = {}
    for row in rows:
        order = tuple(row["order"])
        bad = [b for b in order if b not in AUTO_ORDER]
        if row["op"] not in OPS or row["precision"] not in PRECISION_KEYS or bad or not order:
            raise ValueError(f"dispatch table: bad row {row!r} (backends from {AUTO_ORDER})")
        table[(int(row["min_capability"]), row["op"], row["precision"])] = order
    return table


def _load_table_override() -> None:
    path = os.environ.get("KCM_DISPATCH_TABLE")
    if path:
        DISPATCH_TABLE.update(table_from_json(json.loads(Path(path).read_text())))


def capability_key(capability: tuple[int, int]) -> int:
    return 10 * capability[0] + capability[1]


def preference(op: str, precision: str, capability: tuple[int, int]) -> tuple[str, ...]:
    """The table's backend order for ``op`` at ``precision`` on a GPU of ``capability``."""
    cc = capability_key(capability)
    rows = [k for k in DISPATCH_TABLE if k[1] == op and k[2] == precision and k[0] <= cc]
    if not rows:
        return AUTO_ORDER
    return DISPATCH_TABLE[max(rows)]


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


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _supports(name: str, op: str, precision: str, capability: tuple[int, int]) -> bool:
    supports = getattr(backend_module(name), "supports", None)
    return True if supports is None else bool(supports(op, precision, capability))


def resolve_backend(
    name: object,
    device: torch.device,
    op: str | None = None,
    precision: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Turn a ``backend=`` argument into a concrete backend name for tensors on ``device``.

    With ``op`` and ``precision`` "auto" follows :data:`DISPATCH_TABLE` on CUDA; without
    them, the first available of ``cuda``, ``triton``, ``torch``. float64 ``dtype``: torch.
    """
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name != "auto":
        if not _is_available(name, device):
            raise ValueError(_unavailable_reason(name, device))
        return name
    # Triton on CPU tensors only runs in the (slow) interpreter: never chosen by "auto".
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    if op is None or precision is None:
        order = AUTO_ORDER
        capability = None
    else:
        capability = _capability(device)
        order = preference(op, precision, capability)
    for candidate in order:
        if not _is_available(candidate, device):
            continue
        if capability is not None and not _supports(candidate, op, precision, capability):
            continue
        return candidate
    return "torch"


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


_load_table_override()
