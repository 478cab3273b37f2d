"""One forward pass of the unpruned model over the unlabeled sample, with forward hooks, run
one layer block at a time (kcm_cuda.pruning.blockwise: peak memory is one block plus the
sample's hidden states, and models spread over devices or offloaded run as they are).

Per layer and per batch we keep the sums over the batch's real tokens of each neuron's
activation (the input of W2) and of its square: Σa (bias compensation, FLAP's mean) and Σa²
(D2's energies, Wanda-sp's ‖a_i‖₂, FLAP's variance), so memory is (batches × neurons), never
(tokens × neurons). Padding tokens are excluded with the batch's attention mask.
``token_means`` / ``token_variances`` / ``token_norms`` turn them into per-neuron statistics
over all real tokens. With ``grams=True`` the pass also keeps each layer's (n × n)
second-moment matrix Σ_tokens a aᵀ (float64) and the energy Σ_tokens ‖x‖² of the FFN's
input x (``method="obs"`` reads them). With ``on_gram`` instead, each layer's Gram is
accumulated on the execution device, handed to ``on_gram`` when the layer is done (what the
error-driven layer allocation needs of it: its removal-error curves) and dropped, so the
pass holds one layer's Gram at a time whatever the depth.

Optionally (``kcm_batches`` > 0, D2's "kcm" mode) the first batches also run the R2 procedure
on the activations, inside the hook: points = the columns of the batch's (tokens × n)
activation matrix, divided by sqrt(tokens) (RMS over the batch), K = rbf_kernel(points, σ),
C = kcm_coefficients(K); only diag(C) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kcm_cuda.kernels import kcm_coefficients, rbf_kernel
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.blockwise import (
    capture_block_inputs,
    executing,
    hidden_store,
    run_block,
)
from kcm_cuda.pruning.data import TokenizedSample
from kcm_cuda.pruning.progress import progress_bar
from kcm_cuda.pruning.r2 import median_sigma


@dataclass
class ActivationStats:
    sq_sums: list[torch.Tensor]  # per layer: (n_batches, n) float64, Σ_tokens a_i²
    tokens: torch.Tensor  # (n_batches,) real tokens per batch
    kcm_diag: list[torch.Tensor] | None = None  # per layer: (kcm_batches, n) diag(C)
    kcm_iterations: list[list[int]] | None = None  # per layer, per batch
    sums: list[torch.Tensor] | None = None  # per layer: (n_batches, n) float64, Σ_tokens a_i
    grams: list[torch.Tensor] | None = None  # per layer: (n, n) float64, Σ_tokens a aᵀ
    input_sq: list[float] | None = None  # per layer (with grams): Σ_tokens ‖x‖², x = W1's input
    # what ``on_gram`` computed from each layer's Gram (e.g. the error allocation's removal-error
    # curves, kcm_cuda.pruning.allocation.GramCurves), keyed as it chose
    from_grams: dict | None = None

    @property
    def n_batches(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.sum())


def _need_sums(stats: ActivationStats) -> list[torch.Tensor]:
    if stats.sums is None:
        raise ValueError("these activation statistics carry no Σa (collected without sums)")
    return stats.sums


def token_means(stats: ActivationStats) -> list[torch.Tensor]:
    """Per layer (n,) float64: mean of a_i over all real tokens."""
    n = max(stats.n_tokens, 1)
    return [s.sum(dim=0) / n for s in _need_sums(stats)]


def token_variances(stats: ActivationStats) -> list[torch.Tensor]:
    """Per layer (n,) float64: the unbiased variance of a_i over all real tokens
    (Σa² − (Σa)²/N) / (N − 1), clamped at 0 against rounding."""
    n = stats.n_tokens
    if n < 2:
        raise ValueError(f"a variance over tokens needs at least 2 real tokens, got {n}")
    out = []
    for s1, s2 in zip(_need_sums(stats), stats.sq_sums, strict=True):
        t1, t2 = s1.sum(dim=0), s2.sum(dim=0)
        out.append(((t2 - t1 * t1 / n) / (n - 1)).clamp_min(0.0))
    return out


def token_norms(stats: ActivationStats) -> list[torch.Tensor]:
    """Per layer (n,) float64: ‖a_i‖₂ over all real tokens."""
    return [s.sum(dim=0).clamp_min(0.0).sqrt() for s in stats.sq_sums]


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
    grams: bool = False,
    on_gram=None,
) -> ActivationStats:
    """Per layer and batch Σ_tokens a_i and a_i² of W2's input a (padding excluded); with
    ``grams`` also Σ a aᵀ and the energy of W1's input (kept for every layer, on the CPU).
    ``on_gram(layer, gram, input_sq, layer_stats, block)``: called when a layer is done, with
    its Gram (float64, on the execution device), the energy of its FFN input, its own
    statistics (a one-layer ActivationStats) and the block; what it returns is kept in
    ``from_grams[layer]`` and the Gram is dropped (unless ``grams``)."""
    blocks = adapter.layers(model)
    per_layer: list[list[torch.Tensor]] = [[] for _ in blocks]
    per_layer_sum: list[list[torch.Tensor]] = [[] for _ in blocks]
    gram_acc: list[torch.Tensor | None] = [None for _ in blocks]
    input_sq = [0.0 for _ in blocks]
    want_gram = grams or on_gram is not None
    from_grams: dict = {}
    kcm_diag: list[list[torch.Tensor]] = [[] for _ in blocks]
    kcm_iters: list[list[int]] = [[] for _ in blocks]
    current: dict = {}
    opts = dict(kcm_options or {})
    sigma = opts.pop("sigma", 1.0)  # a number, or "median" (per batch and layer)

    def make_hook(idx: int):
        def hook(_module, args):
            a = real_tokens(args[0], current["mask"]).float()
            per_layer[idx].append((a * a).sum(dim=0, dtype=torch.float64).cpu())
            per_layer_sum[idx].append(a.sum(dim=0, dtype=torch.float64).cpu())
            if want_gram:  # float32 products per batch, summed in float64 where a is
                g = (a.t() @ a).double()
                gram_acc[idx] = g if gram_acc[idx] is None else gram_acc[idx].add_(g)
            if current["batch"] < kcm_batches:
                points = a.t() / max(a.shape[0], 1) ** 0.5  # (n, tokens)
                sig = median_sigma(points) if sigma == "median" else float(sigma)
                K = rbf_kernel(points.contiguous(), sigma=sig, **_kernel_opts(opts))
                C, n_iter = kcm_coefficients(K, **opts)
                kcm_diag[idx].append(torch.diagonal(C).double().cpu())
                kcm_iters[idx].append(int(n_iter))

        return hook

    def make_input_hook(idx: int):
        def hook(_module, args):
            x = real_tokens(args[0], current["mask"]).double()
            input_sq[idx] += float((x * x).sum())

        return hook

    calls, hidden = capture_block_inputs(
        model, adapter, sample, batch_size, store=hidden_store(model, adapter, sample, device)
    )
    tokens = [int(call.mask.sum()) for call in calls]
    bar = progress_bar(
        range(len(blocks)), total=len(blocks), desc="activations", enabled=progress, unit="layer"
    )
    for i in bar:
        with executing(blocks[i], device) as (block, dev):
            handles = [adapter.w2(block).register_forward_pre_hook(make_hook(i))]
            if want_gram:
                handles.append(adapter.w1(block).register_forward_pre_hook(make_input_hook(i)))
            try:
                for b, call in enumerate(calls):
                    current["mask"] = call.mask.to(dev)
                    current["batch"] = b
                    hidden[b] = run_block(block, call, hidden[b], dev)
            finally:
                for h in handles:
                    h.remove()
            check_finite_activations(per_layer[i], i, adapter.w2(block).weight.dtype)
            if on_gram is not None and gram_acc[i] is not None:
                one = ActivationStats(
                    sq_sums=[torch.stack(per_layer[i])],
                    tokens=torch.tensor(tokens, dtype=torch.long),
                    sums=[torch.stack(per_layer_sum[i])],
                )
                from_grams[i] = on_gram(i, gram_acc[i], input_sq[i], one, block)
            if gram_acc[i] is not None:
                gram_acc[i] = gram_acc[i].cpu() if grams else None
    return ActivationStats(
        sq_sums=[torch.stack(x) for x in per_layer],
        tokens=torch.tensor(tokens, dtype=torch.long),
        kcm_diag=[torch.stack(x) for x in kcm_diag] if kcm_batches > 0 else None,
        kcm_iterations=kcm_iters if kcm_batches > 0 else None,
        sums=[torch.stack(x) for x in per_layer_sum],
        grams=[g for g in gram_acc if g is not None] if grams else None,
        input_sq=input_sq if want_gram else None,
        from_grams=from_grams if on_gram is not None else None,
    )


def check_finite_activations(sq_sums: list[torch.Tensor], layer: int, dtype) -> None:
    """ValueError when a layer's activations overflowed (NaN / inf): every statistic, score
    and refit read from them would be garbage, so the run stops here, saying what to do."""
    if all(bool(torch.isfinite(x).all()) for x in sq_sums):
        return
    hint = (
        "the model overflows in float16: load it in bfloat16 or float32 "
        "(kcm-prune --dtype bfloat16; from_pretrained(..., dtype=torch.bfloat16))"
        if dtype == torch.float16
        else "the model or the data makes them overflow (check the weights and the inputs)"
    )
    raise ValueError(
        f"the activations of layer {layer} are not finite (NaN / inf) on the calibration "
        f"sample, in {str(dtype).replace('torch.', '')}: {hint}; nothing was pruned"
    )


def _kernel_opts(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k in ("precision", "backend")}
