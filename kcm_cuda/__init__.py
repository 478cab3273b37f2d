"""kcm_cuda: gradient-free structured pruning of transformers with unlabeled data.

Kernels (GPU-accelerated, one function each):
    rbf_kernel, convex_update, kcm_coefficients, available_backends
Pruning (Kernelized Convex Masking, Nova et al., ICML 2023):
    prune, load_pruned, PruneResult
Deployment: export_onnx (an encoder, pruned or not, to ONNX at its own per-layer sizes)
"""

from __future__ import annotations

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


_KERNEL_NAMES = ("convex_update", "kcm_coefficients", "rbf_kernel")


def __getattr__(name: str):
    # Everything loads when first asked for: ``import kcm_cuda`` (and the command-line entry
    # points, kcm_cuda._entry) imports neither torch nor transformers.
    if name in _KERNEL_NAMES:
        from kcm_cuda import kernels

        return getattr(kernels, name)
    if name == "available_backends":
        from kcm_cuda.dispatch import available_backends

        return available_backends
    if name in _PRUNING_NAMES:
        from kcm_cuda import pruning

        return getattr(pruning, name)
    if name == "export_onnx":
        from kcm_cuda.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'kcm_cuda' has no attribute {name!r}")
