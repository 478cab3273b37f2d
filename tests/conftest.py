"""Test setup. Without a GPU, Triton kernels run in its CPU interpreter, which must be chosen
before triton is imported; on a GPU machine the compiled kernels are tested instead."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _r2_cache_in_tmp(tmp_path, monkeypatch):
    """prune() caches R2 scores on disk by default: keep every test's entries in its own
    temp dir (never in the user's ~/.cache, never shared between tests)."""
    from kcm_cuda.pruning import r2_cache

    monkeypatch.setattr(r2_cache, "default_r2_cache_dir", lambda: tmp_path / "r2_cache")
