"""kcm_cuda: gradient-free structured pruning of transformers with unlabeled data.

Kernels (GPU-accelerated, one function each):
    rbf_kernel, convex_update, kcm_coefficients, available_backends
Pruning (Kernelized Convex Masking, Nova et al., ICML 2023):
    prune, load_pruned, PruneResult
Deployment: export_onnx (an encoder, pruned or not, to ONNX at its own per-layer sizes)
"""

from __future__ import annotations

from kcm_cuda.dispatch import available_backends
from kcm_cuda.kernels import convex_update, kcm_coefficients, rbf_kernel

__version__ = "0.1.0"

__all__ = [
    "PruneResult",
    "available_backends",
    "convex_update",
    "export_onnx",
    "kcm_coefficients",
    "load_pruned",
    "prune",
    "rbf_kernel",
]

_PRUNING_NAMES = ("prune", "load_pruned", "PruneResult")


def __getattr__(name: str):
    # The pruning layer imports transformers: load it only when asked for.
    if name in _PRUNING_NAMES:
        from kcm_cuda import pruning

        return getattr(pruning, name)
    if name == "export_onnx":
        from kcm_cuda.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'kcm_cuda' has no attribute {name!r}")
