"""Where the FFN of each transformer layer lives, for one model family.

An adapter answers, for a supported model: the list of layer blocks, each block's first FFN
linear (W1: hidden → n, the "intermediate" layer) and second FFN linear (W2: n → hidden), the
config fields that hold the hidden size / FFN size / number of heads, and how to give a layer
a new (smaller) FFN. The input of W1 is the FFN sublayer's residual input for every supported
family (post-attention LayerNorm output), and the input of W2 is the activation a = act(W1 x + b1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FFNAdapter:
    """Describes one model family. ``base_classes``: the plain encoder class names."""

    name: str
    base_classes: tuple[str, ...]
    layers_path: tuple[str, ...]  # attribute path from the base model to the ModuleList
    w1_path: tuple[str, ...]  # attribute path from a layer block to W1
    w2_path: tuple[str, ...]  # attribute path from a layer block to W2
    hidden_field: str
    intermediate_field: str
    heads_field: str

    # -- access ---------------------------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        if type(model).__name__ in self.base_classes:
            return model
        base = getattr(model, "base_model", None)
        if base is None or type(base).__name__ not in self.base_classes:
            raise TypeError(f"{type(model).__name__} is not a {self.name} model")
        return base

    def layers(self, model: nn.Module) -> list[nn.Module]:
        mod: nn.Module = self.base_model(model)
        for attr in self.layers_path:
            mod = getattr(mod, attr)
        return list(mod)  # type: ignore[arg-type]

    @staticmethod
    def _get(block: nn.Module, path: tuple[str, ...]) -> nn.Linear:
        mod: nn.Module = block
        for attr in path:
            mod = getattr(mod, attr)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"expected nn.Linear at {'.'.join(path)}, got {type(mod).__name__}")
        return mod

    @staticmethod
    def _set(block: nn.Module, path: tuple[str, ...], new: nn.Module) -> None:
        mod: nn.Module = block
        for attr in path[:-1]:
            mod = getattr(mod, attr)
        setattr(mod, path[-1], new)

    def w1(self, block: nn.Module) -> nn.Linear:
        return self._get(block, self.w1_path)

    def w2(self, block: nn.Module) -> nn.Linear:
        return self._get(block, self.w2_path)

    def hidden_size(self, config) -> int:
        return int(getattr(config, self.hidden_field))

    def num_heads(self, config) -> int:
        return int(getattr(config, self.heads_field))

    def intermediate_sizes(self, model: nn.Module) -> list[int]:
        return [self.w1(block).out_features for block in self.layers(model)]

    # -- surgery --------------------------------------------------------------------------
    def resize_ffn(self, block: nn.Module, n: int) -> None:
        """Replace the block's W1/W2 by fresh linears with ``n`` neurons (callers fill the
        weights)."""
        w1, w2 = self.w1(block), self.w2(block)
        dev, dt = w1.weight.device, w1.weight.dtype
        new1 = nn.Linear(w1.in_features, n, bias=w1.bias is not None, device=dev, dtype=dt)
        new2 = nn.Linear(n, w2.out_features, bias=w2.bias is not None, device=dev, dtype=dt)
        self._set(block, self.w1_path, new1)
        self._set(block, self.w2_path, new2)

    def shrink_ffn(
        self, block: nn.Module, keep: torch.Tensor, scale: torch.Tensor | None = None
    ) -> None:
        """Keep only neurons ``keep`` (bool mask or index tensor); W2's kept columns are
        multiplied by ``scale`` (one value per kept neuron) when given."""
        w1, w2 = self.w1(block), self.w2(block)
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.flatten()
        idx = idx.to(w1.weight.device)
        with torch.no_grad():
            W1 = w1.weight[idx].clone()
            b1 = w1.bias[idx].clone() if w1.bias is not None else None
            W2 = w2.weight[:, idx].clone()
            if scale is not None:
                W2 = W2 * scale.to(W2.device, W2.dtype).unsqueeze(0)
            b2 = w2.bias.clone() if w2.bias is not None else None
            self.resize_ffn(block, int(idx.numel()))
            new1, new2 = self.w1(block), self.w2(block)
            new1.weight.copy_(W1)
            if b1 is not None:
                new1.bias.copy_(b1)
            new2.weight.copy_(W2)
            if b2 is not None:
                new2.bias.copy_(b2)

    def pad_ffn(self, block: nn.Module, n: int) -> None:
        """Grow the block's FFN to ``n`` neurons with zero W1 rows, b1 entries and W2 columns
        (the added neurons contribute exactly nothing)."""
        w1, w2 = self.w1(block), self.w2(block)
        k = w1.out_features
        if n < k:
            raise ValueError(f"cannot pad an FFN of {k} neurons to {n}")
        with torch.no_grad():
            W1, W2 = w1.weight.clone(), w2.weight.clone()
            b1 = w1.bias.clone() if w1.bias is not None else None
            b2 = w2.bias.clone() if w2.bias is not None else None
            self.resize_ffn(block, n)
            new1, new2 = self.w1(block), self.w2(block)
            new1.weight.zero_()
            new1.weight[:k].copy_(W1)
            new2.weight.zero_()
            new2.weight[:, :k].copy_(W2)
            if b1 is not None:
                new1.bias.zero_()
                new1.bias[:k].copy_(b1)
            if b2 is not None:
                new2.bias.copy_(b2)
