"""The method interface: a method looks at a :class:`PruneContext` and returns a
:class:`Selection` (which neurons, and optionally which heads, to keep).

    class MyMethod(Method):
        name = "mine"
        needs_activations = True   # reads ctx.activation_stats() (documentation; lazily computed)
        needs_labels = False       # True: prune() requires labels= (ctx.labels)
        def select(self, ctx) -> Selection: ...

Score-based methods subclass :class:`ScoreMethod` and only write ``scores(ctx)``: one float
tensor per layer (higher = keep), globally comparable; the shared global top-k under the FLOPs
budget (with ``min_keep`` per layer) turns them into masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kcm_cuda.pruning.masks import global_topk

if TYPE_CHECKING:
    from kcm_cuda.pruning.context import PruneContext


@dataclass
class Selection:
    """masks: per layer a bool tensor over the layer's original FFN neurons (True = keep).
    head_masks: per layer a bool tensor over its heads (None: every head kept).
    scales: per layer, one factor per kept neuron folded into W2's kept columns (None: no
    factors; they apply when no reconstruction replaces them). head_scales: per layer, one
    factor per kept head folded into the output projection's columns of that head (None: no
    factors). info: free-form, JSON-able, copied into the report under "selection"."""

    masks: list[torch.Tensor]
    head_masks: list[torch.Tensor] | None = None
    scales: list[torch.Tensor | None] | None = None
    head_scales: list[torch.Tensor | None] | None = None
    info: dict = field(default_factory=dict)


class Method:
    name: str = ""
    needs_activations: bool = False
    needs_labels: bool = False
    # True: the activation pass also accumulates each layer's (n × n) activation Gram
    needs_grams: bool = False
    # True: select() returns its own Selection.head_masks (e.g. kwon); with heads=True the
    # shared heads stage (kcm_cuda.pruning.heads.plan_heads) is then skipped.
    selects_heads: bool = False
    # The reconstruction run when scale=True and reconstruct= is not given (None: the global
    # default, kcm_cuda.pruning.options.DEFAULT_RECONSTRUCTION).
    default_reconstruct: str | None = None

    def check_options(self, options) -> None:
        """Raise ValueError for options the method cannot honour (called before any pass)."""

    def uses_kernels(self, options) -> bool:
        """Whether the method runs the KCM kernels (then ``backend=`` is resolved/checked)."""
        return False

    def select(self, ctx: PruneContext) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError


def times_w2_norm(
    per_neuron: list[torch.Tensor], w2_norms: list[torch.Tensor], power: int = 1
) -> list[torch.Tensor]:
    """Per layer (n,) float64: a per-neuron activation statistic times ‖W2[:, i]‖^power (the
    shape of the Wanda-sp and FLAP scores), with the layer and neuron counts checked."""
    if len(w2_norms) != len(per_neuron):
        raise ValueError(
            f"{len(w2_norms)} W2 norm vectors for {len(per_neuron)} layers of statistics"
        )
    out = []
    for a, w in zip(per_neuron, w2_norms, strict=True):
        if a.shape != w.shape:
            raise ValueError(f"activation statistics of {a.numel()} neurons, W2 of {w.numel()}")
        out.append(a * w.double().cpu() ** power)
    return out


def topk_selection(ctx: PruneContext, scores: list[torch.Tensor], info: dict | None = None):
    """Scores → masks of ctx.k_total neurons (at least ctx.keep_min per layer), the per-layer
    counts decided by ``allocation=`` ("global": one global top-k of the scores; the default
    "auto" is resolved by PruneOptions to "uniform" under the ridge refit, else "global";
    see kcm_cuda.pruning.allocation)."""
    if ctx.options.allocation == "global":
        return Selection(masks=global_topk(scores, ctx.k_total, ctx.keep_min), info=info or {})
    from kcm_cuda.pruning.allocation import allocate_for

    masks, alloc_info = allocate_for(ctx, scores)
    return Selection(masks=masks, info={**(info or {}), **alloc_info})


class ScoreMethod(Method):
    def scores(self, ctx: PruneContext) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_scores(self, stats, w2_norms: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The scores of the layers ``stats`` holds, from those statistics alone, ordered
        within each layer as :meth:`scores` orders it (None: the order needs more than one
        layer's statistics). The activation pass uses it to compute a layer's error curve
        while that layer's Gram is at hand (kcm_cuda.pruning.allocation)."""
        return None

    def select(self, ctx: PruneContext) -> Selection:
        return topk_selection(ctx, self.scores(ctx))
