"""One forward pass of the unpruned model over the unlabeled sample, with forward hooks.

Per layer and per batch we keep only what D2 needs: the sum over the batch's real tokens of
each neuron's squared activation (the input of W2), so memory is (batches × neurons), never
(tokens × neurons). Padding tokens are excluded with the batch's attention mask.

Optionally (``kcm_batches`` > 0, D2's "kcm" mode) the first batches also run the R2 procedure
on the activations, inside the hook: points = the columns of the batch's (tokens × n)
activation matrix, divided by sqrt(tokens) (RMS over the batch), K = rbf_kernel(points, σ),
C = kcm_coefficients(K); only diag(C) is kept.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from kcm_cuda.kernels import kcm_coefficients, rbf_kernel
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.data import TokenizedSample
from kcm_cuda.pruning.progress import progress_bar


@dataclass
class ActivationStats:
    sq_sums: list[torch.Tensor]  # per layer: (n_batches, n) float64, Σ_tokens a_i²
    tokens: torch.Tensor  # (n_batches,) real tokens per batch
    kcm_diag: list[torch.Tensor] | None = None  # per layer: (kcm_batches, n) diag(C)
    kcm_iterations: list[list[int]] | None = None  # per layer, per batch

    @property
    def n_batches(self) -> int:
        return int(self.tokens.numel())


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """Drop inputs the model's forward does not take (DistilBERT has no token_type_ids)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    return {k: v for k, v in batch.items() if k in params}


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, n) → (t, n): rows of the real tokens (mask (B, T) of 0/1)."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    adapter: FFNAdapter,
    sample: TokenizedSample,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    kcm_batches: int = 0,
    kcm_options: dict | None = None,
) -> ActivationStats:
    blocks = adapter.layers(model)
    per_layer: list[list[torch.Tensor]] = [[] for _ in blocks]
    kcm_diag: list[list[torch.Tensor]] = [[] for _ in blocks]
    kcm_iters: list[list[int]] = [[] for _ in blocks]
    current: dict = {}
    opts = dict(kcm_options or {})
    sigma = float(opts.pop("sigma", 1.0))

    def make_hook(idx: int):
        def hook(_module, args):
            a = real_tokens(args[0], current["mask"]).float()
            per_layer[idx].append((a * a).sum(dim=0, dtype=torch.float64).cpu())
            if current["batch"] < kcm_batches:
                points = a.t() / max(a.shape[0], 1) ** 0.5  # (n, tokens)
                K = rbf_kernel(points.contiguous(), sigma=sigma, **_kernel_opts(opts))
                C, n_iter = kcm_coefficients(K, **opts)
                kcm_diag[idx].append(torch.diagonal(C).double().cpu())
                kcm_iters[idx].append(int(n_iter))

        return hook

    handles = [adapter.w2(b).register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    tokens = []
    try:
        bar = progress_bar(
            sample.batches(batch_size, device),
            total=sample.n_batches(batch_size),
            desc="activations (D2)",
            enabled=progress,
            unit="batch",
        )
        for b, batch in enumerate(bar):
            current["mask"] = batch["attention_mask"]
            current["batch"] = b
            tokens.append(int(batch["attention_mask"].sum()))
            model(**model_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    return ActivationStats(
        sq_sums=[torch.stack(x) for x in per_layer],
        tokens=torch.tensor(tokens, dtype=torch.long),
        kcm_diag=[torch.stack(x) for x in kcm_diag] if kcm_batches > 0 else None,
        kcm_iterations=kcm_iters if kcm_batches > 0 else None,
    )


def _kernel_opts(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k in ("precision", "backend")}
