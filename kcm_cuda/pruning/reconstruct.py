"""The reconstruction stage: turn the teacher and a selection into the physically pruned
student, optionally refitting what is kept so that each layer's output matches the teacher's
(label-free, gradient-free, bottom-up).

Variants (``reconstruct=``): "none" (drop the pruned neurons; a selection's own scales are
applied), "scale" (Scale: one factor per kept neuron, kcm_cuda.pruning.scale).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from kcm_cuda.pruning.methods.base import Selection
from kcm_cuda.pruning.physical import prune_heads_in_place, prune_in_place, record_sizes
from kcm_cuda.pruning.scale import scale_and_prune


@dataclass
class ReconstructionResult:
    """Per layer: fallback (the refit failed and the plain pruned layer was kept), the
    relative λ used, the error Σ_t ||ΔY||² on the reconstruction sample before (plain
    pruning) and after the refit, and the target energy Σ_t ||Y||²."""

    name: str
    mode: str
    scales: list[torch.Tensor | None]
    fallback: list[bool] = field(default_factory=list)
    lambda_used: list[float] = field(default_factory=list)
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    o_refit: object | None = None  # heads pruned + head_refit: attn_refit.ORefitResult


def reconstruct(ctx, selection: Selection) -> tuple[nn.Module, ReconstructionResult]:
    """The pruned student (a new module) and what the reconstruction did."""
    o = ctx.options
    name = o.reconstruction()
    masks = selection.masks
    n_layers = len(masks)
    if name == "none":
        student = prune_in_place(copy.deepcopy(ctx.teacher), ctx.adapter, masks, selection.scales)
        if selection.head_masks is not None:
            _fold_head_scales(student, ctx.adapter, selection)  # kwon's tuned head values
            prune_heads_in_place(student, ctx.adapter, selection.head_masks)
        scales = list(selection.scales) if selection.scales is not None else [None] * n_layers
        return student, ReconstructionResult("none", o.reconstruct_mode, scales)
    student = copy.deepcopy(ctx.teacher)
    sample = ctx.sample.subset(o.scale_samples)
    o_refit = None
    if selection.head_masks is not None:
        # Heads first: the FFN reconstruction below then fits the heads-pruned attention.
        prune_heads_in_place(student, ctx.adapter, selection.head_masks)
        if o.head_refit:
            from kcm_cuda.pruning.attn_refit import refit_attention_output

            o_refit = refit_attention_output(
                ctx.teacher,
                student,
                ctx.adapter,
                selection.head_masks,
                sample,
                lam=o.ridge_lambda,
                batch_size=o.batch_size,
                device=ctx.device,
            )
    if name == "scale":
        info = scale_and_prune(
            ctx.teacher,
            student,
            ctx.adapter,
            masks,
            sample,
            lam=o.scale_lambda,
            retries=o.scale_retries,
            batch_size=o.batch_size,
            device=ctx.device,
            progress=o.progress,
        )
        record_sizes(student, ctx.adapter)
        res = ReconstructionResult(
            "scale",
            "sequential",
            list(info.scales),
            fallback=info.fallback,
            lambda_used=info.lambda_used,
            error_before=info.error_unscaled,
            error_after=info.error_scaled,
            target_energy=info.target_energy,
            tokens=info.tokens,
            notes=info.notes,
        )
        if selection.scales is not None:
            res.notes.append("the selection's own scales were replaced by the reconstruction")
        res.o_refit = o_refit
        return student, res
    raise ValueError(f"unknown reconstruction {name!r}")


@torch.no_grad()
def _fold_head_scales(model: nn.Module, adapter, selection: Selection) -> None:
    """Multiply the output-projection columns of each kept head by its factor."""
    if selection.head_scales is None or selection.head_masks is None:
        return
    d_h = adapter.head_size(model.config)
    for block, hm, hs in zip(
        adapter.layers(model), selection.head_masks, selection.head_scales, strict=True
    ):
        if hs is None:
            continue
        o = adapter.o(block)
        col = torch.ones(hm.numel(), dtype=o.weight.dtype, device=o.weight.device)
        col[hm.to(col.device)] = hs.to(col.device, col.dtype)
        o.weight.mul_(col.repeat_interleave(d_h).unsqueeze(0))
