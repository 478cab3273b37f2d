"""The FLOPs (MACs) model of the FFN-only pruning, as in Kwon et al. (2022).

Per layer: attention 4·s·d² + 2·s²·d, FFN 2·s·d·n_kept, with s the mean number of real tokens
per sequence of the unlabeled sample and d the hidden size. Embeddings and the task head are
left out. Only FFN neurons are pruned, so kept FLOPs ≥ the attention floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    @property
    def attention_per_layer(self) -> float:
        s, d = self.seq_len, self.hidden
        return 4.0 * s * d * d + 2.0 * s * s * d

    @property
    def per_neuron(self) -> float:
        return 2.0 * self.seq_len * self.hidden

    @property
    def attention(self) -> float:
        return self.attention_per_layer * len(self.sizes)

    def total(self, kept: list[int] | tuple[int, ...] | None = None) -> float:
        n = sum(self.sizes if kept is None else kept)
        return self.attention + self.per_neuron * n

    @property
    def attention_floor(self) -> float:
        """The smallest reachable FLOPs fraction (every FFN neuron removed)."""
        return self.attention / self.total()

    def neuron_budget(self, c: float, min_kept: int = 0) -> int:
        """k = floor((c·F_full − F_attention) / (2·s·d)), checked against the floor."""
        full = self.total()
        floor = self.attention_floor
        if c < floor:
            raise ValueError(
                f"flops={c:g} is below the attention floor {floor:.4f}: attention alone is "
                f"{100 * floor:.1f}% of the FLOPs (s={self.seq_len:.1f} tokens, d={self.hidden}) "
                "and only FFN neurons are pruned; use flops >= "
                f"{math.ceil(floor * 1000) / 1000:.3f}"
            )
        k = math.floor((c * full - self.attention) / self.per_neuron * (1 + 1e-12))
        k = min(max(k, 0), sum(self.sizes))
        # Guard float rounding: never exceed the budget.
        while k > 0 and self.total_from_count(k) > c * full * (1 + 1e-12):
            k -= 1
        if k < min_kept:
            need = self.total_from_count(min_kept) / full
            raise ValueError(
                f"flops={c:g} leaves {k} FFN neurons but min_keep requires {min_kept} "
                f"(at least {need:.4f} of the FLOPs); raise flops or lower min_keep"
            )
        return k

    def total_from_count(self, n_kept: int) -> float:
        return self.attention + self.per_neuron * n_kept
