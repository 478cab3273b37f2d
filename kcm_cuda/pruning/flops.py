"""The FLOPs (MACs) model of the pruning, as in Kwon et al. (2022).

Per layer: attention 4·s·d² + 2·s²·d, FFN 2·s·d·n_kept, with s the mean number of real tokens
per sequence of the unlabeled sample and d the hidden size. Embeddings and the task head are
left out. FFN-only pruning cannot go below the attention floor (every neuron removed).

With attention heads (``heads`` and ``head_size`` given), attention is counted per kept head:
4·s·d·d_h (its Q, K, V rows and O columns) + 2·s²·d_h (its scores and weighted sum), so a full
layer (H·d_h = d) costs exactly the FFN-only formula and budgets below the attention floor
become reachable; the joint floor keeps ``min_heads`` heads per layer and no neuron.

Decoders (LLaMA family): a gated MLP has three matrices per neuron (``ffn_mats=3``: 3·s·d per
neuron); grouped-query attention projects K and V to ``kv_heads``·d_h only, so a layer's
projections cost s·d·(2·H·d_h + 2·H_kv·d_h) (``proj_width``); causal attention computes
about half the score matrix (s²·H·d_h instead of 2·s²·H·d_h). The LM head (s·d·V, never
pruned) is reported beside the budget (``lm_head``), not inside it: like the encoders' task
head and embeddings, the budget ``c`` is a fraction of the transformer blocks' FLOPs.

Decoders with heads pruned (grouped-query attention, n_q query and n_kv KV heads, g = n_q/n_kv):
a query head costs 2·s·d·d_h (its Q rows and O columns) + s²·d_h (causal scores and weighted
sum), a KV head 2·s·d·d_h (its K and V rows). The budget is split in head *units*, the thing
the structure removes (``heads`` counts units per layer, ``head_cost`` is a unit's MACs,
``heads_per_unit`` its query heads): ``gqa_heads="groups"`` removes a KV group (1 KV head and
its g query heads), ``"per_group"`` one query head in every group (n_kv query heads; K and V
stay, ``attention_fixed`` per layer). Either way a full layer costs the FFN-only formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class BudgetError(ValueError):
    """A FLOPs budget these options cannot reach (below the attention floor, or fewer neurons
    than min_keep asks for): the input is fine, the combination is not."""


def check_flops(flops: object) -> float:
    if isinstance(flops, bool) or not isinstance(flops, (int, float)):
        raise TypeError(f"flops must be a number in (0, 1], got {type(flops).__name__}")
    c = float(flops)
    if not math.isfinite(c):
        raise ValueError(f"flops must be a finite number in (0, 1], got {flops!r}")
    if c <= 0.0 or c > 1.0:
        raise ValueError(
            f"flops is the fraction of FLOPs to keep and must be in (0, 1], got {flops!r}"
        )
    return c


@dataclass(frozen=True)
class FlopsModel:
    seq_len: float  # s
    hidden: int  # d
    sizes: tuple[int, ...]  # FFN neurons per layer (before pruning)
    heads: tuple[int, ...] | None = None  # attention heads per layer (before pruning)
    head_size: int | None = None  # d_h
    ffn_mats: int = 2  # weight matrices per FFN neuron (3 for a gated MLP)
    proj_width: float | None = None  # Σ output widths of Q, K, V, O per layer (None: 4·d)
    attn_width: int | None = None  # H·d_h (None: d)
    causal: bool = False  # causal attention: half of the s² terms
    lm_head: float = 0.0  # MACs of the LM head over the sequence (reported, not budgeted)
    head_cost: float | None = None  # MACs of one head unit (None: 4·s·d·d_h + 2·s²·d_h)
    heads_per_unit: int = 1  # query heads per head unit (grouped-query attention)
    attention_fixed: float = 0.0  # per layer: attention MACs head pruning never removes

    def __post_init__(self) -> None:
        if (self.heads is None) != (self.head_size is None):
            raise ValueError("FlopsModel: give both heads and head_size, or neither")
        if self.heads is not None and len(self.heads) != len(self.sizes):
            raise ValueError(
                f"FlopsModel: {len(self.heads)} head counts for {len(self.sizes)} layers"
            )

    @property
    def attention_per_layer(self) -> float:
        """An unpruned layer's attention (with heads: its own H·d_h instead of d)."""
        s, d = self.seq_len, self.hidden
        proj = 4.0 * d if self.proj_width is None else float(self.proj_width)
        width = d if self.attn_width is None else self.attn_width
        return s * d * proj + (1.0 if self.causal else 2.0) * s * s * width

    @property
    def per_neuron(self) -> float:
        return float(self.ffn_mats) * self.seq_len * self.hidden

    @property
    def per_head(self) -> float:
        """One head unit's MACs: ``head_cost`` when given, else 4·s·d·d_h + 2·s²·d_h (needs
        ``head_size``)."""
        if self.head_size is None:
            raise ValueError("this FlopsModel has no head_size (FFN-only)")
        if self.head_cost is not None:
            return float(self.head_cost)
        s, d, dh = self.seq_len, self.hidden, self.head_size
        return 4.0 * s * d * dh + 2.0 * s * s * dh

    @property
    def attention(self) -> float:
        if self.heads is not None:
            return self.per_head * sum(self.heads) + self._fixed
        return self.attention_per_layer * len(self.sizes)

    @property
    def _fixed(self) -> float:
        return self.attention_fixed * len(self.sizes)

    def attention_cost(self, kept_heads: Sequence[int] | int | None = None) -> float:
        """MACs of the attention keeping ``kept_heads`` head units (per layer or in total);
        None: all of it."""
        if kept_heads is None:
            return self.attention
        n = kept_heads if isinstance(kept_heads, int) else sum(kept_heads)
        return self.per_head * n + self._fixed

    def units_of(self, query_heads: Sequence[int]) -> list[int]:
        """Head units per layer of a layer-wise count of kept query heads."""
        return [int(q) // self.heads_per_unit for q in query_heads]

    def min_units(self, min_heads: int) -> int:
        """The head units per layer that keep at least ``min_heads`` query heads."""
        return -(-int(min_heads) // self.heads_per_unit)

    def total(
        self,
        kept: Sequence[int] | None = None,
        kept_heads: Sequence[int] | int | None = None,
    ) -> float:
        n = sum(self.sizes if kept is None else kept)
        return self.attention_cost(kept_heads) + self.per_neuron * n

    @property
    def attention_floor(self) -> float:
        """The smallest FLOPs fraction FFN-only pruning reaches (every FFN neuron removed)."""
        return self.attention / self.total()

    def joint_floor(self, min_heads: int = 1) -> float:
        """The smallest fraction with heads pruned too: ``min_heads`` (query heads) per layer,
        no neuron."""
        return self.attention_cost(self.min_units(min_heads) * len(self.sizes)) / self.total()

    def neuron_budget(
        self,
        c: float,
        min_kept: int = 0,
        kept_heads: Sequence[int] | int | None = None,
        *,
        lower: str = "prune heads too to go lower",
    ) -> int:
        """k = floor((c·F_full − F_attention) / (2·s·d)), checked against the floor;
        F_attention counts ``kept_heads`` when given (else the whole attention). ``lower``:
        what the error below the attention floor advises (FFN-only budgets)."""
        full = self.total()
        attn = self.attention_cost(kept_heads)
        floor = attn / full
        if c < floor:
            what = (
                "attention alone"
                if kept_heads is None
                else f"the {(attn - self._fixed) / self.per_head:.0f} kept "
                f"{'heads' if self.heads_per_unit == 1 else 'head units'} alone"
            )
            hint = (
                f"only FFN neurons are pruned ({lower}); "
                if kept_heads is None
                else ""
            )
            raise BudgetError(
                f"flops={c:g} is below the attention floor {floor:.4f}: {what} is "
                f"{100 * floor:.1f}% of the FLOPs (s={self.seq_len:.1f} tokens, d={self.hidden}) "
                f"and {hint}use flops >= {math.ceil(floor * 1000) / 1000:.3f}"
            )
        k = math.floor((c * full - attn) / self.per_neuron * (1 + 1e-12))
        k = min(max(k, 0), sum(self.sizes))
        # Guard float rounding: never exceed the budget.
        while k > 0 and attn + self.per_neuron * k > c * full * (1 + 1e-12):
            k -= 1
        if k < min_kept:
            need = (attn + self.per_neuron * min_kept) / full
            raise BudgetError(
                f"flops={c:g} leaves {k} FFN neurons but min_keep requires {min_kept} "
                f"(at least {need:.4f} of the FLOPs); raise flops or lower min_keep"
            )
        return k

    def total_from_count(self, n_kept: int, kept_heads: Sequence[int] | int | None = None) -> float:
        return self.attention_cost(kept_heads) + self.per_neuron * n_kept
