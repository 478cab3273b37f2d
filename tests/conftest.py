"""Test setup. Without a GPU, Triton kernels run in its CPU interpreter, which must be chosen
before triton is imported; on a GPU machine the compiled kernels are tested instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
