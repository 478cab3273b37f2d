"""Physical pruning: remove the pruned rows of W1/b1 and columns of W2 (the kept columns
multiplied by their Scale factors), so each layer gets its own FFN size; the config records
the per-layer sizes in ``kcm_intermediate_sizes``.

Heads: ``prune_heads_in_place`` removes the pruned heads of every layer (rows of Q, K, V, columns
of O; at least one head per layer) and records the per-layer head counts in
``kcm_attention_heads`` (the config's own head-count field keeps the unpruned count, which fixes
the head size d_h = hidden / heads). ``apply_head_masks_in_place`` is the masked equivalent
(O's columns of the pruned heads zeroed: a head reaches the residual stream only through O).

Grouped-query attention (decoders): a head mask is over the query heads; a KV head goes with
its group when the group keeps no query head, and the kept groups keep equally many query
heads (kcm_cuda.pruning.adapters.base). The per-layer KV-head counts are recorded in
``kcm_key_value_heads`` and each attention module's ``num_key_value_groups`` is set to its own
n_q / n_kv (the config's head counts and head_dim keep the unpruned values)."""

from __future__ import annotations

import torch
from torch import nn

from kcm_cuda.pruning.adapters import FFNAdapter

SIZES_FIELD = "kcm_intermediate_sizes"
HEADS_FIELD = "kcm_attention_heads"
KV_HEADS_FIELD = "kcm_key_value_heads"


def record_sizes(model: nn.Module, adapter: FFNAdapter) -> list[int]:
    """Write the per-layer FFN sizes into the config (the config's own FFN-size field gets
    the largest, so a model whose layers are all equal loads with plain from_pretrained)."""
    sizes = adapter.intermediate_sizes(model)
    setattr(model.config, SIZES_FIELD, sizes)
    setattr(model.config, adapter.intermediate_field, max(sizes) if sizes else 0)
    return sizes


MLP_BIAS_FIELD = "kcm_mlp_bias"


def record_mlp_bias(model: nn.Module, adapter: FFNAdapter) -> bool:
    """When the refit gave the FFN output (down_proj) a bias the family's config does not
    declare, record it: the family's own field (LLaMA: ``mlp_bias``) when it has one, else
    ``kcm_mlp_bias`` (``load_pruned`` adds the biases back). True when W2 has a bias."""
    blocks = adapter.layers(model)
    has = [adapter.w2(b).bias is not None for b in blocks]
    if not any(has) or not adapter.causal:
        return any(has)
    for b in blocks:  # every layer alike, as the family's class builds them
        adapter.ensure_w2_bias(b)
    if adapter.mlp_bias_field is not None:
        setattr(model.config, adapter.mlp_bias_field, True)
    else:
        setattr(model.config, MLP_BIAS_FIELD, True)
    return True


def check_masks(adapter: FFNAdapter, blocks: list, masks: list[torch.Tensor]) -> None:
    if len(masks) != len(blocks):
        raise ValueError(f"got {len(masks)} masks for {len(blocks)} layers")
    for i, (block, mask) in enumerate(zip(blocks, masks, strict=True)):
        n = adapter.w1(block).out_features
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.numel() != n:
            raise ValueError(f"mask of layer {i} must be a bool tensor of {n} entries")


@torch.no_grad()
def prune_in_place(
    model: nn.Module,
    adapter: FFNAdapter,
    masks: list[torch.Tensor],
    scales: list[torch.Tensor | None] | None = None,
) -> nn.Module:
    """Shrink every layer of ``model`` (a copy the caller owns) to its mask."""
    blocks = adapter.layers(model)
    check_masks(adapter, blocks, masks)
    for i, (block, mask) in enumerate(zip(blocks, masks, strict=True)):
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


def record_heads(model: nn.Module, adapter: FFNAdapter) -> list[int]:
    """Write the per-layer head counts into the config (``kcm_attention_heads``) when any
    layer has fewer heads than the config's count (or the field is already there)."""
    counts = adapter.head_counts(model)
    full = adapter.num_heads(model.config)
    kv = adapter.kv_head_counts(model) if adapter.grouped else None
    kv_full = adapter.num_kv_heads(model.config)
    changed = any(n != full for n in counts) or (kv is not None and any(n != kv_full for n in kv))
    if changed or hasattr(model.config, HEADS_FIELD):
        setattr(model.config, HEADS_FIELD, counts)
        if kv is not None:
            setattr(model.config, KV_HEADS_FIELD, kv)
    return counts


def _check_head_masks(adapter: FFNAdapter, blocks: list, head_masks, d_h: int) -> None:
    if len(head_masks) != len(blocks):
        raise ValueError(f"got {len(head_masks)} head masks for {len(blocks)} layers")
    for i, (block, mask) in enumerate(zip(blocks, head_masks, strict=True)):
        h = adapter.block_heads(block, d_h)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.numel() != h:
            raise ValueError(f"head mask of layer {i} must be a bool tensor of {h} entries")
        if not bool(mask.any()):
            raise ValueError(
                f"head mask of layer {i} keeps no head: every layer must keep at least 1"
            )
        if adapter.grouped:
            try:
                adapter.kept_kv_heads(block, mask.cpu().nonzero().flatten(), d_h)
            except ValueError as exc:
                raise ValueError(f"head mask of layer {i}: {exc}") from None


@torch.no_grad()
def prune_heads_in_place(
    model: nn.Module, adapter: FFNAdapter, head_masks: list[torch.Tensor]
) -> nn.Module:
    """Remove the pruned heads of every layer (``head_masks[l]``: bool over the layer's current
    heads, True = keep, at least one True) and record the counts in the config."""
    blocks = adapter.layers(model)
    d_h = adapter.head_size(model.config)
    _check_head_masks(adapter, blocks, head_masks, d_h)
    for block, mask in zip(blocks, head_masks, strict=True):
        if not bool(mask.all()):
            adapter.shrink_heads(block, mask.cpu(), d_h)
    record_heads(model, adapter)
    return model


@torch.no_grad()
def apply_head_masks_in_place(
    model: nn.Module, adapter: FFNAdapter, head_masks: list[torch.Tensor]
) -> nn.Module:
    """The masked (not shrunk) equivalent: O's columns of the pruned heads zeroed."""
    blocks = adapter.layers(model)
    d_h = adapter.head_size(model.config)
    _check_head_masks(adapter, blocks, head_masks, d_h)
    for block, mask in zip(blocks, head_masks, strict=True):
        o = adapter.o(block)
        col = mask.to(o.weight.device).repeat_interleave(d_h).to(o.weight.dtype)
        o.weight.mul_(col.unsqueeze(0))
    return model
