"""The ``reference`` backend: float64 truth from kcm_cuda.reference, returned as float32 on
the input's device. ``precision`` is ignored (everything is float64)."""

from __future__ import annotations

import torch

from kcm_cuda import reference


def rbf_kernel(x: torch.Tensor, y: torch.Tensor | None, sigma: float, precision: str):
    return reference.rbf_kernel(x, y, sigma).to(x.device, torch.float32)


def convex_update(K: torch.Tensor, C: torch.Tensor, precision: str):
    C_new, delta, mass = reference.convex_update(K, C)
    return tuple(t.to(K.device, torch.float32) for t in (C_new, delta, mass))
