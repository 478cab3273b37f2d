"""Helpers shared by the Triton kernels: interpreter detection and the device guard."""

from __future__ import annotations

import contextlib

import torch


def is_interpreted(fn: object) -> bool:
    """Whether a ``@triton.jit`` function runs in the interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton layouts
        return False
    return isinstance(fn, InterpretedFunction)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the launches inside.

    Triton launches on the *current* device and takes the tensors' raw pointers: without the
    guard, tensors on cuda:1 while cuda:0 is current read foreign memory (illegal address).
    CPU tensors (interpreter) need no guard.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the persistent grids' size unit);
    under the interpreter a small fixed count so the tile loops run several rounds."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3
