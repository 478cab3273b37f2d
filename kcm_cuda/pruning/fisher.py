"""Mask variables on attention heads and FFN neurons, and their empirical Fisher information
from the task loss (Kwon et al., NeurIPS 2022, "A Fast Post-Training Pruning Framework for
Transformers", Sec. 3-4).

A head mask m_h multiplies head h's context vectors (the input slice of the attention output
projection W_O that belongs to h); a neuron mask m_i multiplies the FFN activation a_i (the
input of W2). With every mask at 1 the model is unchanged; the model's weights are never
modified here. The masks are applied by forward pre-hooks, so the same mechanism serves the
gradient collection (masks with ``requires_grad``), the layer-wise mask tuning (float mask
values) and the masked reference model.

The gradients are per example: the mask tensors get a leading example axis (all ones), the
per-example losses are summed, and one backward pass gives every example's own gradient
∂L(x_j, y_j)/∂m exactly. The empirical diagonal Fisher is Σ_j g_j² (Kwon et al.'s eq. 4 up to
the 1/|D| factor, which no later step depends on).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.data import TokenizedSample

# The two post-sublayer LayerNorms per family (their inputs are the sublayer outputs plus the
# residual); the attention accessors come from the adapters (FFNAdapter.o, head_size).
_LN_PATHS = {
    "BERT": (("attention", "output", "LayerNorm"), ("output", "LayerNorm")),
    "RoBERTa": (("attention", "output", "LayerNorm"), ("output", "LayerNorm")),
    "DistilBERT": (("sa_layer_norm",), ("output_layer_norm",)),
}


def _get(block: nn.Module, path: tuple[str, ...]) -> nn.Module:
    mod = block
    for attr in path:
        mod = getattr(mod, attr)
    return mod


@dataclass(frozen=True)
class LayerParts:
    """The modules of one transformer block that the Kwon method touches."""

    w_o: nn.Linear  # attention output projection (input: heads' contexts, concatenated)
    w2: nn.Linear  # FFN output projection (input: activations)
    ln_attn: nn.Module  # LayerNorm after the attention sublayer (input: W_O(ctx) + b_O + x)
    ln_ffn: nn.Module  # LayerNorm after the FFN sublayer (input: W2(a) + b2 + h)
    n_heads: int
    head_dim: int
    block: nn.Module | None = None  # the transformer block itself


def layer_parts(model: nn.Module, adapter: FFNAdapter) -> list[LayerParts]:
    if adapter.name not in _LN_PATHS or not adapter.o_path:
        raise TypeError(f"head masks are not supported for {adapter.name} models")
    ln1_path, ln2_path = _LN_PATHS[adapter.name]
    d_h = adapter.head_size(model.config)
    return [
        LayerParts(
            w_o=adapter.o(block),
            w2=adapter.w2(block),
            ln_attn=_get(block, ln1_path),
            ln_ffn=_get(block, ln2_path),
            n_heads=adapter.block_heads(block, d_h),
            head_dim=d_h,
            block=block,
        )
        for block in adapter.layers(model)
    ]


@contextmanager
def masked(
    parts: list[LayerParts],
    head_masks: list[torch.Tensor | None] | None,
    neuron_masks: list[torch.Tensor | None] | None,
):
    """Apply mask values while inside the block. Each mask is (units,) or (batch, units);
    None leaves that layer's heads / neurons unmasked."""
    handles = []

    def head_hook(mask: torch.Tensor, n_heads: int):
        def hook(_module, args):
            (x,) = args
            m = mask.to(x.dtype)
            shape = (-1,) + (1,) * (x.dim() - 2) + (n_heads, 1) if m.dim() == 2 else (n_heads, 1)
            xs = x.unflatten(-1, (n_heads, -1)) * m.reshape(shape)
            return (xs.flatten(-2),)

        return hook

    def neuron_hook(mask: torch.Tensor):
        def hook(_module, args):
            (x,) = args
            m = mask.to(x.dtype)
            if m.dim() == 2:
                m = m.reshape((m.shape[0],) + (1,) * (x.dim() - 2) + (m.shape[1],))
            return (x * m,)

        return hook

    try:
        for i, p in enumerate(parts):
            if head_masks is not None and head_masks[i] is not None:
                handles.append(p.w_o.register_forward_pre_hook(head_hook(head_masks[i], p.n_heads)))
            if neuron_masks is not None and neuron_masks[i] is not None:
                handles.append(p.w2.register_forward_pre_hook(neuron_hook(neuron_masks[i])))
        yield
    finally:
        for h in handles:
            h.remove()


LogitsFn = Callable[[nn.Module, dict], torch.Tensor]


def default_logits_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a model with a task head (``model(**batch).logits``)."""
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} has no task head (its output has no logits): the kwon "
            "method needs the task loss; pass a model with a classification head or "
            "classifier= (a module or callable mapping the encoder's last hidden state and "
            "attention mask to logits)"
        )
    return logits


def head_logits_fn(head: Callable) -> LogitsFn:
    """Logits for an encoder-only model plus a separate head taking (last_hidden_state,
    attention_mask)."""

    def fn(model: nn.Module, batch: dict) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        return head(hidden, batch["attention_mask"])

    return fn


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example losses: cross-entropy for integer labels, squared error for float ones."""
    if labels.dtype.is_floating_point:
        if logits.shape[-1] != 1:
            raise ValueError(
                f"float (regression) labels need a model with one output, got {logits.shape[-1]}"
            )
        return (logits.squeeze(-1).float() - labels) ** 2
    n_cls = logits.shape[-1]
    if int(labels.max()) >= n_cls:
        raise ValueError(
            f"class label {int(labels.max())} is out of range for a model with {n_cls} outputs"
        )
    return nn.functional.cross_entropy(logits.float(), labels, reduction="none")


@dataclass
class MaskGrads:
    """Per-example mask gradients, per layer: heads (N, H), neurons (N, n_l)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    loss: float  # mean task loss over the sample (dense model)

    def head_fisher(self) -> list[torch.Tensor]:
        return [g.pow(2).sum(0) for g in self.heads]

    def neuron_fisher(self) -> list[torch.Tensor]:
        return [g.pow(2).sum(0) for g in self.neurons]


def collect_mask_grads(
    model: nn.Module,
    parts: list[LayerParts],
    sample: TokenizedSample,
    logits_fn: LogitsFn,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> MaskGrads:
    """Per-example gradients of the task loss w.r.t. every head and neuron mask variable
    (all masks at 1; the model's parameters get no gradients and are not changed), one row
    per sequence of ``sample`` in its order."""
    if sample.labels is None:
        raise ValueError("the kwon method uses labels: pass labels= aligned with data")
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    head_g: list[list[torch.Tensor]] = [[] for _ in parts]
    neuron_g: list[list[torch.Tensor]] = [[] for _ in parts]
    total_loss, n = 0.0, 0
    try:
        for batch, y in zip(
            sample.batches(batch_size, device), sample.label_batches(batch_size), strict=True
        ):
            b = batch["input_ids"].shape[0]
            hm = [torch.ones(b, p.n_heads, device=device, requires_grad=True) for p in parts]
            nm = [torch.ones(b, p.w2.in_features, device=device, requires_grad=True) for p in parts]
            with torch.enable_grad(), masked(parts, hm, nm):
                losses = task_loss(logits_fn(model, batch), y.to(device))
                grads = torch.autograd.grad(losses.sum(), hm + nm)
            for i in range(len(parts)):
                head_g[i].append(grads[i].detach().float().cpu())
                neuron_g[i].append(grads[len(parts) + i].detach().float().cpu())
            total_loss += float(losses.detach().sum())
            n += b
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    # The batches come in length order (TokenizedSample.batch_rows): rows back to sample order.
    where = torch.cat(sample.batch_rows(batch_size)).argsort()
    return MaskGrads(
        heads=[torch.cat(g)[where] for g in head_g],
        neurons=[torch.cat(g)[where] for g in neuron_g],
        loss=total_loss / max(n, 1),
    )
