"""Optional memo of the expensive stages across ``prune()`` calls.

Pass the same ``dict`` as ``prune(..., cache=d)`` to several calls (e.g. a sweep over FLOPs
targets, merges, Scale on/off): the R2 scores and the activation statistics are computed once
per (model weights, options) and reused. Keys hold a fingerprint of the weights (and of the
token sample for activations), so a changed model or sample never hits a stale entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, t.numel())).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    return fingerprint(p for _, p in sorted(model.state_dict().items()))
