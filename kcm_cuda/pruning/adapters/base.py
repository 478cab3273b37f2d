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

Decoder families (``causal=True``: LLaMA, Mistral, Qwen2) have a gated MLP,
down(act(gate(x)) ⊙ up(x)): W1 is ``gate_proj`` and ``ffn_in_paths`` names the other input
linear(s) (``up_proj``) whose rows are removed together with W1's; the activation statistic is
still W2's (``down_proj``'s) input. Their MLP has no biases, so the refit adds a zero down_proj
bias first (:meth:`FFNAdapter.ensure_w2_bias`); it is recorded in the config (``mlp_bias``
where the family's transformers class reads it, else ``kcm_mlp_bias`` for ``load_pruned``).
Grouped-query attention: ``kv_heads_field`` holds the number of key/value heads. Query head i
reads KV head i // g (g = n_q / n_kv, ``kv_groups_attr`` of the attention module, which the
forward's ``repeat_kv`` uses), so Q's rows are grouped per KV head. A head mask of such a
block is over its query heads; shrinking keeps the KV heads whose group keeps a query head,
and every kept group must keep the same number of query heads (the layer's new g).
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
    # -- decoders -------------------------------------------------------------------------
    causal: bool = False  # a causal (decoder-only) LM: causal attention, right padding
    ffn_in_paths: tuple[tuple[str, ...], ...] = ()  # gated MLP: the other input linears (up)
    kv_heads_field: str | None = None  # grouped-query attention: config field of KV heads
    head_dim_field: str | None = None  # config field of d_h when the family has one
    mlp_bias_field: str | None = None  # config field that gives the MLP linears a bias
    kv_groups_attr: str | None = None  # attention module attribute: query heads per KV head
    # positions start after the padding index (RoBERTa: padding_idx + 1), so the model reads
    # max_position_embeddings − pad_token_id − 1 tokens at most
    positions_after_padding: bool = False

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

    def ffn_inputs(self, block: nn.Module) -> list[nn.Linear]:
        """Every linear whose output rows are the FFN's neurons: W1 (and up_proj when gated)."""
        return [self.w1(block)] + [self._get(block, p) for p in self.ffn_in_paths]

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per neuron (2, or 3 for a gated MLP): the FLOPs per neuron."""
        return 2 + len(self.ffn_in_paths)

    @property
    def grouped(self) -> bool:
        """Grouped-query attention (K and V have their own head count)."""
        return self.kv_heads_field is not None

    def num_kv_heads(self, config) -> int:
        if self.kv_heads_field is None:
            return self.num_heads(config)
        return int(getattr(config, self.kv_heads_field, None) or self.num_heads(config))

    def context_length(self, config) -> int | None:
        """The longest sequence the model can read (None: unknown / unlimited)."""
        n = getattr(config, "max_position_embeddings", None)
        if not isinstance(n, int) or n <= 0:
            return None
        if self.positions_after_padding:
            pad = getattr(config, "pad_token_id", None)
            n -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
        return n if n > 0 else None

    @torch.no_grad()
    def ensure_w2_bias(self, block: nn.Module) -> bool:
        """Give W2 a zero bias when it has none (the refit writes one); with a
        ``mlp_bias_field`` the other MLP linears get zero biases too, so that the family's
        own class (``mlp_bias=True``) loads the saved model. True when a bias was added."""
        w2 = self.w2(block)
        if w2.bias is not None:
            return False
        linears = [w2] + (self.ffn_inputs(block) if self.mlp_bias_field else [])
        for lin in linears:
            if lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, device=w.device, dtype=w.dtype),
                    requires_grad=w.requires_grad,
                )
        return True

    def hidden_size(self, config) -> int:
        return int(getattr(config, self.hidden_field))

    def num_heads(self, config) -> int:
        return int(getattr(config, self.heads_field))

    def intermediate_sizes(self, model: nn.Module) -> list[int]:
        return [self.w1(block).out_features for block in self.layers(model)]

    # -- surgery --------------------------------------------------------------------------
    def resize_ffn(self, block: nn.Module, n: int) -> None:
        """Replace the block's FFN linears (W1, up_proj when gated, W2) by fresh linears with
        ``n`` neurons (callers fill the weights)."""
        for path in (self.w1_path, *self.ffn_in_paths):
            old = self._get(block, path)
            dev, dt = old.weight.device, old.weight.dtype
            new = nn.Linear(old.in_features, n, bias=old.bias is not None, device=dev, dtype=dt)
            self._set(block, path, new)
        w2 = self.w2(block)
        dev, dt = w2.weight.device, w2.weight.dtype
        new2 = nn.Linear(n, w2.out_features, bias=w2.bias is not None, device=dev, dtype=dt)
        self._set(block, self.w2_path, new2)

    def _ffn_state(self, block: nn.Module):
        ins = [
            (lin.weight.clone(), lin.bias.clone() if lin.bias is not None else None)
            for lin in self.ffn_inputs(block)
        ]
        w2 = self.w2(block)
        return ins, w2.weight.clone(), (w2.bias.clone() if w2.bias is not None else None)

    def shrink_ffn(
        self, block: nn.Module, keep: torch.Tensor, scale: torch.Tensor | None = None
    ) -> None:
        """Keep only neurons ``keep`` (bool mask or index tensor); W2's kept columns are
        multiplied by ``scale`` (one value per kept neuron) when given."""
        w1 = self.w1(block)
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.flatten()
        idx = idx.to(w1.weight.device)
        with torch.no_grad():
            ins, W2, b2 = self._ffn_state(block)
            W2 = W2[:, idx]
            if scale is not None:
                W2 = W2 * scale.to(W2.device, W2.dtype).unsqueeze(0)
            self.resize_ffn(block, int(idx.numel()))
            for lin, (w, b) in zip(self.ffn_inputs(block), ins, strict=True):
                lin.weight.copy_(w[idx])
                if b is not None:
                    lin.bias.copy_(b[idx])
            new2 = self.w2(block)
            new2.weight.copy_(W2)
            if b2 is not None:
                new2.bias.copy_(b2)

    def pad_ffn(self, block: nn.Module, n: int) -> None:
        """Grow the block's FFN to ``n`` neurons with zero W1 (and up_proj) rows and biases and
        zero W2 columns (the added neurons contribute exactly nothing)."""
        k = self.w1(block).out_features
        if n < k:
            raise ValueError(f"cannot pad an FFN of {k} neurons to {n}")
        with torch.no_grad():
            ins, W2, b2 = self._ffn_state(block)
            self.resize_ffn(block, n)
            for lin, (w, b) in zip(self.ffn_inputs(block), ins, strict=True):
                lin.weight.zero_()
                lin.weight[:k].copy_(w)
                if b is not None:
                    lin.bias.zero_()
                    lin.bias[:k].copy_(b)
            new2 = self.w2(block)
            new2.weight.zero_()
            new2.weight[:, :k].copy_(W2)
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
        """d_h: the config's head-dim field when the family has one, else hidden / heads
        (from the config, which keeps the unpruned head count)."""
        if self.head_dim_field is not None:
            d_h = getattr(config, self.head_dim_field, None)
            if isinstance(d_h, int) and d_h > 0:
                return d_h
        return self.hidden_size(config) // self.num_heads(config)

    def block_heads(self, block: nn.Module, head_size: int) -> int:
        """The number of heads the block has now."""
        return self.q(block).out_features // head_size

    def block_kv_heads(self, block: nn.Module, head_size: int) -> int:
        """The number of key/value heads the block has now (= its heads without GQA)."""
        return self.k(block).out_features // head_size

    def head_counts(self, model: nn.Module) -> list[int]:
        d_h = self.head_size(model.config)
        return [self.block_heads(b, d_h) for b in self.layers(model)]

    def kv_head_counts(self, model: nn.Module) -> list[int]:
        d_h = self.head_size(model.config)
        return [self.block_kv_heads(b, d_h) for b in self.layers(model)]

    def _set_head_count(self, block: nn.Module, n: int, head_size: int, kv: int) -> None:
        att = self.attention(block)
        for attr in self.heads_attrs:
            setattr(att, attr, n)
        for attr in self.all_head_size_attrs:
            setattr(att, attr, n * head_size)
        if self.kv_groups_attr is not None:
            setattr(att, self.kv_groups_attr, n // kv)

    def kept_kv_heads(self, block: nn.Module, keep: torch.Tensor, head_size: int) -> torch.Tensor:
        """Grouped-query attention: the KV heads (indices) a kept set of query heads (indices)
        reads, checked: every kept group keeps the same number of query heads."""
        n_q, n_kv = self.block_heads(block, head_size), self.block_kv_heads(block, head_size)
        if n_kv < 1 or n_q % n_kv:
            raise ValueError(f"{n_q} query heads are not a whole number of {n_kv} KV groups")
        group = torch.div(keep, n_q // n_kv, rounding_mode="floor")
        kv, per_group = torch.unique(group, return_counts=True)
        if per_group.numel() and bool((per_group != per_group[0]).any()):
            raise ValueError(
                "grouped-query attention: every kept KV group must keep the same number of "
                f"query heads, got {dict(zip(kv.tolist(), per_group.tolist(), strict=True))}"
            )
        return kv

    def resize_heads(self, block: nn.Module, n: int, head_size: int, kv: int | None = None) -> None:
        """Replace Q, K, V, O by fresh linears for ``n`` heads (callers fill the weights);
        with grouped-query attention K and V get ``kv`` heads (None: as many as now), which
        must divide ``n``."""
        if n < 1:
            raise ValueError(f"a layer must keep at least 1 attention head, got {n}")
        if not self.grouped:
            kv = n
        elif kv is None:
            kv = self.block_kv_heads(block, head_size)
        if kv < 1 or n % kv:
            raise ValueError(f"{n} query heads are not a whole number of {kv} KV groups")
        for path, width in (
            (self.q_path, n * head_size),
            (self.k_path, kv * head_size),
            (self.v_path, kv * head_size),
        ):
            old = self._get(block, path)
            dev, dt = old.weight.device, old.weight.dtype
            new = nn.Linear(old.in_features, width, bias=old.bias is not None, device=dev, dtype=dt)
            self._set(block, path, new)
        width = n * head_size
        o = self.o(block)
        dev, dt = o.weight.device, o.weight.dtype
        self._set(
            block,
            self.o_path,
            nn.Linear(width, o.out_features, bias=o.bias is not None, device=dev, dtype=dt),
        )
        self._set_head_count(block, n, head_size, kv)

    @staticmethod
    def _rows(heads: torch.Tensor, head_size: int, device) -> torch.Tensor:
        """The row (or column) indices of ``heads`` (head indices)."""
        return (
            heads.to(device).unsqueeze(1) * head_size + torch.arange(head_size, device=device)
        ).flatten()

    def shrink_heads(self, block: nn.Module, keep: torch.Tensor, head_size: int) -> None:
        """Keep only heads ``keep`` (bool mask over the block's current query heads, or head
        indices): rows of Q, K, V and columns of O of those heads, in the given order. With
        grouped-query attention K and V keep the rows of the KV heads the kept query heads
        read (``kept_kv_heads``), and the kept query heads must be in group order."""
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
        if self.grouped:
            kv_idx = self.kept_kv_heads(block, idx, head_size)
            g_now = n_now // self.block_kv_heads(block, head_size)
            if bool((torch.diff(torch.div(idx, g_now, rounding_mode="floor")) < 0).any()):
                raise ValueError("grouped-query attention: kept query heads must be in group order")
        else:
            kv_idx = idx
        dev = self.q(block).weight.device
        cols = self._rows(idx, head_size, dev)
        kv_rows = self._rows(kv_idx, head_size, dev)
        with torch.no_grad():
            saved = []
            for lin, rows in (
                (self.q(block), cols),
                (self.k(block), kv_rows),
                (self.v(block), kv_rows),
            ):
                w = lin.weight[rows].clone()
                b = lin.bias[rows].clone() if lin.bias is not None else None
                saved.append((w, b))
            o = self.o(block)
            wo = o.weight[:, cols].clone()
            bo = o.bias.clone() if o.bias is not None else None
            self.resize_heads(block, int(idx.numel()), head_size, int(kv_idx.numel()))
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

    def padded_head_slots(
        self, block: nn.Module, n: int, head_size: int, kv: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the block's current query heads and KV heads sit in a zero-padded layout of
        ``n`` query heads (and ``kv`` KV heads with grouped-query attention): KV head j stays
        at slot j and its query heads take the first slots of group j (j·n/kv …), so that
        query head i of the padded layout still reads KV head i // (n / kv)."""
        q_now = self.block_heads(block, head_size)
        if not self.grouped:
            return torch.arange(q_now), torch.arange(q_now)
        kv_now = self.block_kv_heads(block, head_size)
        kv = kv_now if kv is None else kv
        if kv < kv_now or n % kv or q_now % kv_now or q_now // kv_now > n // kv:
            raise ValueError(
                f"cannot pad {q_now} query / {kv_now} KV heads to {n} query / {kv} KV heads"
            )
        g_now, g = q_now // kv_now, n // kv
        q_slots = (torch.arange(kv_now).unsqueeze(1) * g + torch.arange(g_now)).flatten()
        return q_slots, torch.arange(kv_now)

    def pad_heads(self, block: nn.Module, n: int, head_size: int, kv: int | None = None) -> None:
        """Grow the block to ``n`` heads (``kv`` KV heads with grouped-query attention) with
        all-zero heads (zero Q, K, V rows and biases, zero O columns): a zero head's scores are
        0, its softmax is uniform, its context softmax·(0·x + 0) is exactly 0 and O's zero
        columns add exactly nothing (a zero query head reading a real KV head also adds
        nothing: its O columns are zero). Layout: ``padded_head_slots``."""
        k = self.block_heads(block, head_size)
        if n < k:
            raise ValueError(f"cannot pad an attention of {k} heads to {n}")
        kv_now = self.block_kv_heads(block, head_size) if self.grouped else k
        kv = (kv_now if kv is None else kv) if self.grouped else n
        if n == k and kv == kv_now:
            return
        q_slots, kv_slots = self.padded_head_slots(block, n, head_size, kv)
        dev = self.q(block).weight.device
        q_rows = self._rows(q_slots, head_size, dev)
        kv_rows = self._rows(kv_slots, head_size, dev)
        with torch.no_grad():
            saved = []
            for lin in (self.q(block), self.k(block), self.v(block)):
                saved.append(
                    (lin.weight.clone(), lin.bias.clone() if lin.bias is not None else None)
                )
            o = self.o(block)
            wo, bo = o.weight.clone(), (o.bias.clone() if o.bias is not None else None)
            self.resize_heads(block, n, head_size, kv)
            for lin, (wt, b), rows in zip(
                (self.q(block), self.k(block), self.v(block)),
                saved,
                (q_rows, kv_rows, kv_rows),
                strict=True,
            ):
                lin.weight.zero_()
                lin.weight[rows] = wt
                if b is not None:
                    lin.bias.zero_()
                    lin.bias[rows] = b
            o = self.o(block)
            o.weight.zero_()
            o.weight[:, q_rows] = wo
            if bo is not None:
                o.bias.copy_(bo)
