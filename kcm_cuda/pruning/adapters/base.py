"""Where the FFN of each transformer layer lives, for one model family.

An adapter answers, for a supported model: the list of layer blocks, each block's first FFN
linear (W1: hidden → n, the "intermediate" layer) and second FFN linear (W2: n → hidden), the
config fields that hold the hidden size / FFN size / number of heads, and how to give a layer
a new (smaller) FFN. The input of W1 is the FFN sublayer's residual input for every supported
family (post-attention LayerNorm output), and the input of W2 is the activation a = act(W1 x + b1).

Attention heads (``attn_path`` … ``o_path``, ``heads_attrs``): the Q, K, V linears (hidden →
H·d_h) and the output projection O (H·d_h → hidden) of each block. Head h owns rows
h·d_h … (h+1)·d_h−1 of Q, K, V (weights and biases) and the same columns of O. A block's
attention is shrunk to its kept heads by slicing those four linears and updating the
attention module's head-count attributes (the transformers 5.x forward reshapes with
``view(..., -1, attention_head_size)``, so d_h never changes and only the count does).
Every block keeps at least one head (``shrink_heads`` refuses 0): the 5.x forward cannot
reshape an empty projection (``view(..., -1, d_h)`` of 0 elements is ambiguous).
The config's head-count field is never changed (it fixes d_h = hidden / heads); the per-layer
counts live in ``config.kcm_attention_heads`` (see physical.py).
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
    attn_path: tuple[str, ...] = ()  # block → the module whose forward splits the heads
    q_path: tuple[str, ...] = ()
    k_path: tuple[str, ...] = ()
    v_path: tuple[str, ...] = ()
    o_path: tuple[str, ...] = ()
    heads_attrs: tuple[str, ...] = ()  # attributes of the attention module = number of heads
    all_head_size_attrs: tuple[str, ...] = ()  # attributes = heads · d_h

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

    # -- attention heads ------------------------------------------------------------------
    def attention(self, block: nn.Module) -> nn.Module:
        mod: nn.Module = block
        for attr in self.attn_path:
            mod = getattr(mod, attr)
        return mod

    def q(self, block: nn.Module) -> nn.Linear:
        return self._get(block, self.q_path)

    def k(self, block: nn.Module) -> nn.Linear:
        return self._get(block, self.k_path)

    def v(self, block: nn.Module) -> nn.Linear:
        return self._get(block, self.v_path)

    def o(self, block: nn.Module) -> nn.Linear:
        """The attention output projection (its input is the concatenated head contexts)."""
        return self._get(block, self.o_path)

    def head_size(self, config) -> int:
        """d_h = hidden / heads (from the config, which keeps the unpruned head count)."""
        return self.hidden_size(config) // self.num_heads(config)

    def block_heads(self, block: nn.Module, head_size: int) -> int:
        """The number of heads the block has now."""
        return self.q(block).out_features // head_size

    def head_counts(self, model: nn.Module) -> list[int]:
        d_h = self.head_size(model.config)
        return [self.block_heads(b, d_h) for b in self.layers(model)]

    def _set_head_count(self, block: nn.Module, n: int, head_size: int) -> None:
        att = self.attention(block)
        for attr in self.heads_attrs:
            setattr(att, attr, n)
        for attr in self.all_head_size_attrs:
            setattr(att, attr, n * head_size)

    def resize_heads(self, block: nn.Module, n: int, head_size: int) -> None:
        """Replace Q, K, V, O by fresh linears for ``n`` heads (callers fill the weights)."""
        if n < 1:
            raise ValueError(f"a layer must keep at least 1 attention head, got {n}")
        width = n * head_size
        for path in (self.q_path, self.k_path, self.v_path):
            old = self._get(block, path)
            dev, dt = old.weight.device, old.weight.dtype
            new = nn.Linear(old.in_features, width, bias=old.bias is not None, device=dev, dtype=dt)
            self._set(block, path, new)
        o = self.o(block)
        dev, dt = o.weight.device, o.weight.dtype
        self._set(
            block,
            self.o_path,
            nn.Linear(width, o.out_features, bias=o.bias is not None, device=dev, dtype=dt),
        )
        self._set_head_count(block, n, head_size)

    def shrink_heads(self, block: nn.Module, keep: torch.Tensor, head_size: int) -> None:
        """Keep only heads ``keep`` (bool mask over the block's current heads, or head
        indices): rows of Q, K, V and columns of O of those heads, in the given order."""
        n_now = self.block_heads(block, head_size)
        if keep.dtype == torch.bool:
            if keep.numel() != n_now:
                raise ValueError(f"head mask has {keep.numel()} entries for {n_now} heads")
            idx = keep.nonzero().flatten()
        else:
            idx = keep.flatten().long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_now):
                raise ValueError(f"head indices must be in [0, {n_now}), got {idx.tolist()}")
        if idx.numel() < 1:
            raise ValueError(
                "a layer must keep at least 1 attention head (the transformers forward "
                "cannot run with none)"
            )
        q = self.q(block)
        cols = (
            idx.to(q.weight.device).unsqueeze(1) * head_size
            + torch.arange(head_size, device=q.weight.device)
        ).flatten()
        with torch.no_grad():
            saved = []
            for lin in (self.q(block), self.k(block), self.v(block)):
                w = lin.weight[cols].clone()
                b = lin.bias[cols].clone() if lin.bias is not None else None
                saved.append((w, b))
            o = self.o(block)
            wo = o.weight[:, cols].clone()
            bo = o.bias.clone() if o.bias is not None else None
            self.resize_heads(block, int(idx.numel()), head_size)
            for lin, (w, b) in zip(
                (self.q(block), self.k(block), self.v(block)), saved, strict=True
            ):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            o = self.o(block)
            o.weight.copy_(wo)
            if bo is not None:
                o.bias.copy_(bo)

    def pad_heads(self, block: nn.Module, n: int, head_size: int) -> None:
        """Grow the block to ``n`` heads with all-zero heads (zero Q, K, V rows and biases,
        zero O columns): a zero head's scores are 0, its softmax is uniform, its context
        softmax·(0·x + 0) is exactly 0 and O's zero columns add exactly nothing."""
        k = self.block_heads(block, head_size)
        if n < k:
            raise ValueError(f"cannot pad an attention of {k} heads to {n}")
        if n == k:
            return
        w = k * head_size
        with torch.no_grad():
            saved = []
            for lin in (self.q(block), self.k(block), self.v(block)):
                saved.append(
                    (lin.weight.clone(), lin.bias.clone() if lin.bias is not None else None)
                )
            o = self.o(block)
            wo, bo = o.weight.clone(), (o.bias.clone() if o.bias is not None else None)
            self.resize_heads(block, n, head_size)
            for lin, (wt, b) in zip(
                (self.q(block), self.k(block), self.v(block)), saved, strict=True
            ):
                lin.weight.zero_()
                lin.weight[:w].copy_(wt)
                if b is not None:
                    lin.bias.zero_()
                    lin.bias[:w].copy_(b)
            o = self.o(block)
            o.weight.zero_()
            o.weight[:, :w].copy_(wo)
            if bo is not None:
                o.bias.copy_(bo)
