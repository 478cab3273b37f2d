"""The ``triton`` backend: one Triton kernel per op (Liger-Kernel style, one file each).

    rbf_kernel(x, y, sigma, precision)   tiled x @ y^T with the RBF fused in the epilogue
    convex_update(K, C, precision)       batched tiled K @ C with the multiplicative update and
                                         the delta/mass partial sums fused in the epilogue

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported; slow, for tests). Inputs are validated by kcm_cuda.kernels.
"""

from __future__ import annotations

from kcm_cuda.kernels.triton.convex_update import convex_update, convex_update_transposed
from kcm_cuda.kernels.triton.rbf_kernel import rbf_kernel

__all__ = ["convex_update", "convex_update_transposed", "rbf_kernel"]
