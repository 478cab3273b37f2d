"""Physical pruning: remove the pruned rows of W1/b1 and columns of W2 (the kept columns
multiplied by their Scale factors), so each layer gets its own FFN size; the config records
the per-layer sizes in ``kcm_intermediate_sizes``."""

from __future__ import annotations

import torch
from torch import nn

from kcm_cuda.pruning.adapters import FFNAdapter

SIZES_FIELD = "kcm_intermediate_sizes"


def record_sizes(model: nn.Module, adapter: FFNAdapter) -> list[int]:
    """Write the per-layer FFN sizes into the config (the config's own FFN-size field gets
    the largest, so a model whose layers are all equal loads with plain from_pretrained)."""
    sizes = adapter.intermediate_sizes(model)
    setattr(model.config, SIZES_FIELD, sizes)
    setattr(model.config, adapter.intermediate_field, max(sizes) if sizes else 0)
    return sizes


@torch.no_grad()
def prune_in_place(
    model: nn.Module,
    adapter: FFNAdapter,
    masks: list[torch.Tensor],
    scales: list[torch.Tensor | None] | None = None,
) -> nn.Module:
    """Shrink every layer of ``model`` (a copy the caller owns) to its mask."""
    blocks = adapter.layers(model)
    if len(masks) != len(blocks):
        raise ValueError(f"got {len(masks)} masks for {len(blocks)} layers")
    for i, (block, mask) in enumerate(zip(blocks, masks, strict=True)):
        n = adapter.w1(block).out_features
        if mask.dtype != torch.bool or mask.numel() != n:
            raise ValueError(f"mask of layer {i} must be a bool tensor of {n} entries")
        scale = scales[i] if scales is not None else None
        adapter.shrink_ffn(block, mask, scale)
    record_sizes(model, adapter)
    return model


@torch.no_grad()
def apply_masks_in_place(
    model: nn.Module,
    adapter: FFNAdapter,
    masks: list[torch.Tensor],
    scales: list[torch.Tensor | None] | None = None,
) -> nn.Module:
    """The masked (not shrunk) equivalent: pruned W2 columns zeroed, kept ones scaled."""
    for i, (block, mask) in enumerate(zip(adapter.layers(model), masks, strict=True)):
        w2 = adapter.w2(block)
        col = torch.zeros(mask.numel(), dtype=w2.weight.dtype, device=w2.weight.device)
        s = scales[i] if scales is not None and scales[i] is not None else None
        col[mask.to(col.device)] = 1.0 if s is None else s.to(col.device, col.dtype)
        w2.weight.mul_(col.unsqueeze(0))
    return model
