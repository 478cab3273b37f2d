"""``kwon``: the LABELLED upper anchor, after Kwon et al., "A Fast Post-Training Pruning
Framework for Transformers" (NeurIPS 2022, arXiv 2204.09656). This method USES LABELS.

Four steps, all without retraining and without touching the weights until the final fold:
  1. Fisher: per-example gradients of the task loss w.r.t. head and neuron mask variables
     (kcm_cuda.pruning.fisher); the importance of a unit is its diagonal Fisher Σ_j g_j².
  2. Mask search under the FLOPs constraint (their Algorithm 1): for every number of kept
     heads h, the rest of the budget buys ⌊(budget − h·F_head)/F_neuron⌋ neurons; the globally
     most important heads / neurons are kept, and the h with the largest kept Fisher mass wins.
     F_head = 4·s·d·d_h + 2·s²·d_h, F_neuron = 2·s·d (MACs; s = mean real tokens).
  3. Mask rearrangement (their Algorithm 2): per layer and unit type, with the block-diagonal
     Fisher (the per-example gradient vectors of the layer), the pruned set Z is improved
     greedily to lower Σ_j (Σ_{i∈Z} g_ji)² — the layer's second-order loss estimate — keeping
     its size: the units are visited by increasing Fisher, each is added to Z and then the
     member whose removal leaves the smallest loss is removed.
  4. Mask tuning (their Sec. 4.3): bottom-up, per layer, the kept heads' and then the kept
     neurons' mask values are refit by linear least squares so that the pruned model's
     sublayer output (before LayerNorm, residual included) matches the dense model's, on the
     pruned model's own inputs: heads with an extra free intercept column (dropped after the
     solve), layer 0's heads not tuned; the system is their normal-equation form solved by
     LSMR with damp=1 around mask = 1 (x = 1 + lsmr(AᵀA, AᵀB − AᵀA·1)); if LSMR stops with
     istop ≥ 3 or any value leaves [−10, 10], tuning stops there (the rest stays binary).
Departures from the reference code: gradients per example (the paper's definition; the code
uses mini-batch gradients); the tuning targets use all real tokens in every layer (the code
uses only [CLS] in the last FFN of classification models, which does not fit mean-pooling
heads); every layer keeps its most important head (the transformers 5 forward cannot run a
layer with none; the reference's MAC search may empty a layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.data import TokenizedSample
from kcm_cuda.pruning.fisher import (
    LayerParts,
    LogitsFn,
    MaskGrads,
    collect_mask_grads,
    default_logits_fn,
    head_logits_fn,
    layer_parts,
    masked,
)
from kcm_cuda.pruning.methods.base import Method, Selection

USES_LABELS = True


# -- FLOPs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointFlops:
    """MACs of heads and neurons (Kwon et al.): per head 4·s·d·d_h + 2·s²·d_h, per neuron
    2·s·d. Embeddings and the task head are left out."""

    seq_len: float
    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # heads per layer before pruning
    neurons: tuple[int, ...]  # neurons per layer before pruning

    @property
    def per_head(self) -> float:
        s, d, dh = self.seq_len, self.hidden, self.head_dim
        return 4.0 * s * d * dh + 2.0 * s * s * dh

    @property
    def per_neuron(self) -> float:
        return 2.0 * self.seq_len * self.hidden

    def total(self, n_heads: int | None = None, n_neurons: int | None = None) -> float:
        h = sum(self.heads) if n_heads is None else n_heads
        n = sum(self.neurons) if n_neurons is None else n_neurons
        return self.per_head * h + self.per_neuron * n


# -- step 2: search -----------------------------------------------------------------------
@dataclass
class SearchResult:
    head_masks: list[torch.Tensor]  # bool (H_l,)
    neuron_masks: list[torch.Tensor]  # bool (n_l,)
    n_heads: int
    n_neurons: int
    kept_fisher: float


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, sizes))


def search_masks(
    head_fisher: list[torch.Tensor],
    neuron_fisher: list[torch.Tensor],
    fm: JointFlops,
    c: float,
    min_heads: int = 1,
) -> SearchResult:
    """Their Algorithm 1 under the budget c·F_full (never exceeded). ``min_heads`` heads per
    layer (the most important ones) are always kept and paid for first: the transformers
    forward cannot run a layer without heads (as their latency search, which also keeps a
    minimum per layer); the search runs over the rest."""
    sizes_h = [f.numel() for f in head_fisher]
    hf = torch.cat([f.double().flatten() for f in head_fisher])
    nf = torch.cat([f.double().flatten() for f in neuron_fisher])
    reserved = torch.zeros(hf.numel(), dtype=torch.bool)
    offset = 0
    for f in head_fisher:
        top = f.double().flatten().argsort(descending=True, stable=True)[:min_heads]
        reserved[offset + top] = True
        offset += f.numel()
    budget = c * fm.total()
    n_res = int(reserved.sum())
    if fm.total(n_res, 0) > budget:
        raise ValueError(
            f"flops={c:g} is below the floor of head+neuron pruning "
            f"{fm.total(n_res, 0) / fm.total():.4f} ({min_heads} head(s) per layer, no neuron)"
        )
    free = (~reserved).nonzero().flatten()
    h_sorted, order = hf[free].sort(descending=True, stable=True)
    h_idx = free[order]
    n_sorted, n_idx = nf.sort(descending=True, stable=True)
    cum_h = torch.cat([hf.new_zeros(1), h_sorted.cumsum(0)])
    cum_n = torch.cat([nf.new_zeros(1), n_sorted.cumsum(0)])
    base = float(hf[reserved].sum())
    best = None
    for h in range(free.numel() + 1):
        rest = budget - (n_res + h) * fm.per_head
        if rest < 0:
            break
        n = min(math.floor(rest / fm.per_neuron), nf.numel())
        while n > 0 and fm.total(n_res + h, n) > budget:  # float rounding guard
            n -= 1
        if fm.total(n_res + h, n) > budget:
            continue
        score = base + float(cum_h[h] + cum_n[n])
        if best is None or score > best[0]:
            best = (score, h, n)
    assert best is not None  # h = 0 always fits (checked above)
    score, h, n = best
    hm = reserved.clone()
    hm[h_idx[:h]] = True
    nm = torch.zeros(nf.numel(), dtype=torch.bool)
    nm[n_idx[:n]] = True
    return SearchResult(
        head_masks=_split(hm, sizes_h),
        neuron_masks=_split(nm, [f.numel() for f in neuron_fisher]),
        n_heads=n_res + h,
        n_neurons=n,
        kept_fisher=score,
    )


# -- step 3: rearrangement ----------------------------------------------------------------
def pruned_loss(grads: torch.Tensor, pruned: torch.Tensor) -> float:
    """The layer's block-diagonal Fisher estimate of pruning ``pruned`` (bool): Σ_j
    (Σ_{i∈Z} g_ji)² over the examples j."""
    return float(grads.double()[:, pruned].sum(1).pow(2).sum())


def rearrange_layer(mask: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Greedy rearrangement of one layer's kept set (their Algorithm 2); ``grads`` (N, units).
    Keeps the number of kept units; never raises :func:`pruned_loss`."""
    n_units = mask.numel()
    n_pruned = n_units - int(mask.sum())
    if n_pruned == 0 or n_pruned == n_units:
        return mask.clone()
    g = grads.double().t().contiguous()  # (units, N)
    order = g.pow(2).sum(1).argsort(stable=True).tolist()  # increasing Fisher
    pruned = list(order[:n_pruned])
    total = g[pruned].sum(0)
    for j in order[n_pruned:]:
        pruned.append(j)
        total = total + g[j]
        cand = g[pruned]  # (|Z|+1, N)
        # ||total − g_i||² for every member i: the loss left after removing i.
        left = (total.unsqueeze(0) - cand).pow(2).sum(1)
        r = int(left.argmin())
        total = total - g[pruned[r]]
        del pruned[r]
    out = torch.ones(n_units, dtype=torch.bool)
    out[pruned] = False
    return out


# -- step 4: mask tuning ------------------------------------------------------------------
class _Stop(Exception):
    pass


def _solve(ata: torch.Tensor, atb: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x = 1 + argmin ||AᵀA·y − (AᵀB − AᵀA·1)||² + ||y||² (LSMR, damp = 1); ok = istop < 3."""
    from scipy.sparse.linalg import lsmr

    r = atb - ata.sum(1)
    if r.numel() == 1:
        if float(ata[0, 0]) == 0.0:
            return torch.ones(1, dtype=torch.float64), False
        return r / ata[0, 0] + 1.0, True
    sol = lsmr(ata.numpy(), r.numpy(), damp=1.0, maxiter=100_000)
    x = torch.from_numpy(np.asarray(sol[0], dtype=np.float64)) + 1.0
    return x, int(sol[1]) < 3 and bool(torch.isfinite(x).all())


@dataclass
class TuneInfo:
    head_scales: list[torch.Tensor | None]
    neuron_scales: list[torch.Tensor | None]
    stopped_at: str | None  # "layer i heads/neurons: reason" when tuning stopped early
    error_before: list[float] = field(default_factory=list)  # FFN reconstruction, per layer
    error_after: list[float] = field(default_factory=list)


@dataclass
class _Call:
    """One batch's call of a transformer block: its positional / keyword arguments with the
    hidden states taken out (the same for every block of the batch), and the real-token mask."""

    args: tuple
    kwargs: dict
    hidden_key: int | str  # where the hidden states go (position or keyword)
    keep: torch.Tensor


def _run_block(block: nn.Module, call: _Call, hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = list(call.args), dict(call.kwargs)
    if isinstance(call.hidden_key, int):
        args.insert(call.hidden_key, hidden)
    else:
        kwargs[call.hidden_key] = hidden
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _teacher_targets(model, parts, sample, batch_size, device):
    """The dense model's pre-LayerNorm sublayer outputs (real tokens only), per batch, and
    each batch's call of the first block (its input, the embeddings, is the student's too)."""
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    calls: list[tuple[_Call, torch.Tensor]] = []
    for batch in sample.batches(batch_size, device):
        keep = batch["attention_mask"].bool()
        got: dict[tuple[int, int], torch.Tensor] = {}
        seen: dict[str, object] = {}
        handles = []
        for i, p in enumerate(parts):
            for k, ln in enumerate((p.ln_attn, p.ln_ffn)):

                def hook(_m, a, key=(i, k), keep=keep, got=got):
                    got[key] = a[0][keep].double()

                handles.append(ln.register_forward_pre_hook(hook))

        def first(_m, args, kwargs, seen=seen):
            if args:
                seen["h"], seen["call"] = args[0], (tuple(args[1:]), dict(kwargs), 0)
            else:
                key = next(k for k in ("hidden_states", "hidden_state", "x") if k in kwargs)
                rest = {k: v for k, v in kwargs.items() if k != key}
                seen["h"], seen["call"] = kwargs[key], ((), rest, key)

        handles.append(parts[0].block.register_forward_pre_hook(first, with_kwargs=True))
        try:
            model(**batch)
        finally:
            for h in handles:
                h.remove()
        out.append([(got[(i, 0)], got[(i, 1)]) for i in range(len(parts))])
        a, kw, key = seen["call"]  # type: ignore[misc]
        calls.append((_Call(a, kw, key, keep), seen["h"]))  # type: ignore[arg-type]
    return out, calls


@torch.no_grad()
def _block_pass(parts, i, call: _Call, hidden, module, masks, fn):
    """Run block ``i`` alone (masked) on ``hidden`` up to ``module``'s LayerNorm and call
    ``fn`` with the raw (pre-mask) input of its projection and the LayerNorm's input, real
    tokens only."""
    p = parts[i]
    proj, ln = (p.w_o, p.ln_attn) if module == "attn" else (p.w2, p.ln_ffn)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, a):
        seen["x"] = a[0][call.keep].double()

    def stop(_m, a):
        fn(seen["x"], a[0][call.keep].double())
        raise _Stop

    h1 = proj.register_forward_pre_hook(grab)  # before the mask hook: sees the raw input
    h2 = ln.register_forward_pre_hook(stop)
    try:
        with masked(parts, *masks):
            _run_block(p.block, call, hidden)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()


@torch.no_grad()
def _heads_system(parts, i, calls, hidden, teacher, masks, kept):
    """AᵀA, AᵀB of layer i's kept heads (+ the intercept column)."""
    p = parts[i]
    W = p.w_o.weight.detach().double()
    b_o = p.w_o.bias.detach().double() if p.w_o.bias is not None else 0.0
    Wk = W.view(W.shape[0], p.n_heads, p.head_dim)[:, kept.to(W.device)]
    m_now = masks[0][i].to(W.device, torch.float64)
    k = kept.numel()
    acc = {
        "ata": torch.zeros(k + 1, k + 1, dtype=torch.float64),
        "atb": torch.zeros(k + 1, dtype=torch.float64),
    }
    for bi, ((call, _), h) in enumerate(zip(calls, hidden, strict=True)):

        def fn(ctx, ln_in, bi=bi):
            ctxh = ctx.view(ctx.shape[0], p.n_heads, p.head_dim)
            x_res = ln_in - (ctxh * m_now.view(1, -1, 1)).flatten(1) @ W.t() - b_o
            target = teacher[bi][i][0].to(ctx.device) - b_o - x_res
            a = torch.einsum("nkd,okd->kno", ctxh[:, kept.to(ctx.device)], Wk).flatten(1)
            a = torch.cat([a, torch.ones(1, a.shape[1], dtype=a.dtype, device=a.device)])
            acc["ata"] += (a @ a.t()).cpu()
            acc["atb"] += (a @ target.flatten()).cpu()

        _block_pass(parts, i, call, h, "attn", masks, fn)
    return acc["ata"], acc["atb"]


@torch.no_grad()
def _ffn_system(parts, i, calls, hidden, teacher, masks, kept):
    """AᵀA, AᵀB of layer i's kept neurons, and ||B − A·1||² (the error before tuning)."""
    p = parts[i]
    W2 = p.w2.weight.detach().double()
    b2 = p.w2.bias.detach().double() if p.w2.bias is not None else 0.0
    W2k = W2[:, kept.to(W2.device)]
    m_now = masks[1][i].to(W2.device, torch.float64)
    k = kept.numel()
    acc = {
        "hth": torch.zeros(k, k, dtype=torch.float64),
        "atb": torch.zeros(k, dtype=torch.float64),
        "e0": 0.0,
    }
    for bi, ((call, _), h) in enumerate(zip(calls, hidden, strict=True)):

        def fn(act, ln_in, bi=bi):
            h_res = ln_in - (act * m_now) @ W2.t() - b2
            target = teacher[bi][i][1].to(act.device) - b2 - h_res
            hk = act[:, kept.to(act.device)]
            acc["hth"] += (hk.t() @ hk).cpu()
            acc["atb"] += (hk * (target @ W2k)).sum(0).cpu()
            acc["e0"] += float((target - hk @ W2k.t()).pow(2).sum())

        _block_pass(parts, i, call, h, "ffn", masks, fn)
    return acc["hth"] * (W2k.t() @ W2k).cpu(), acc["atb"], acc["e0"]


def _out_of_range(what: str, ok: bool, x: torch.Tensor) -> str | None:
    if not ok:
        return f"{what}: LSMR did not converge"
    if float(x.max()) > 10 or float(x.min()) < -10:
        return f"{what}: a mask value left [-10, 10] ({float(x.min()):.3g}..{float(x.max()):.3g})"
    return None


def tune_masks(
    model: nn.Module,
    parts: list[LayerParts],
    sample: TokenizedSample,
    head_masks: list[torch.Tensor],
    neuron_masks: list[torch.Tensor],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    tune_heads: bool = True,
) -> TuneInfo:
    """Layer-wise least-squares mask tuning (step 4). Returns the mask values of the kept
    units per layer (None for a layer with none kept) and, per layer, the FFN sublayer's
    squared reconstruction error before / after its neurons are tuned."""
    model.eval()
    teacher, calls = _teacher_targets(model, parts, sample, batch_size, device)
    hidden = [h for _, h in calls]  # the student's input of the current block, per batch
    hv = [m.double().clone() for m in head_masks]  # current mask values
    nv = [m.double().clone() for m in neuron_masks]
    stopped = None
    err_before: list[float] = []
    err_after: list[float] = []
    for i in range(len(parts)):
        kept_h = head_masks[i].nonzero().flatten()
        if tune_heads and i > 0 and kept_h.numel() > 0:
            ata, atb = _heads_system(parts, i, calls, hidden, teacher, (hv, nv), kept_h)
            x, ok = _solve(ata, atb)
            stopped = _out_of_range(f"layer {i} heads", ok, x[:-1])
            if stopped:
                break
            hv[i][kept_h] = hv[i][kept_h] * x[:-1]
        kept_n = neuron_masks[i].nonzero().flatten()
        if kept_n.numel() > 0:
            ata, atb, e0 = _ffn_system(parts, i, calls, hidden, teacher, (hv, nv), kept_n)
            x, ok = _solve(ata, atb)
            stopped = _out_of_range(f"layer {i} neurons", ok, x)
            if stopped:
                break
            # ||B − A·v||² = ||B||² + vᵀAᵀAv − 2·vᵀAᵀB, and e0 is its value at v = 1.
            ones = torch.ones_like(x)
            err_before.append(e0)
            err_after.append(
                e0 - float(ones @ ata @ ones - 2 * ones @ atb) + float(x @ ata @ x - 2 * x @ atb)
            )
            nv[i][kept_n] = nv[i][kept_n] * x
        if i + 1 < len(parts):  # the next block's input: this block with its final masks
            with torch.no_grad(), masked(parts, hv, nv):
                hidden = [
                    _run_block(parts[i].block, call, h)
                    for (call, _), h in zip(calls, hidden, strict=True)
                ]
    L = len(parts)
    head_scales = [
        hv[i][head_masks[i]].float() if bool(head_masks[i].any()) else None for i in range(L)
    ]
    neuron_scales = [
        nv[i][neuron_masks[i]].float() if bool(neuron_masks[i].any()) else None for i in range(L)
    ]
    return TuneInfo(head_scales, neuron_scales, stopped, err_before, err_after)


# -- the whole method ---------------------------------------------------------------------
@dataclass
class KwonSelection:
    head_masks: list[torch.Tensor]  # bool (H,) per layer
    neuron_masks: list[torch.Tensor]  # bool (n_l,) per layer
    head_scales: list[torch.Tensor | None]  # per kept head (None: all 1 / none kept)
    neuron_scales: list[torch.Tensor | None]  # per kept neuron
    info: dict


def select_kwon(
    model: nn.Module,
    adapter: FFNAdapter,
    sample: TokenizedSample,
    c: float,
    logits_fn: LogitsFn,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    rearrange: bool = True,
    tune: bool = True,
) -> KwonSelection:
    """Steps 1-4 on ``model`` (a copy the caller owns; its weights are not changed)."""
    import time

    timings: dict[str, float] = {}
    parts = layer_parts(model, adapter)
    t0 = time.perf_counter()
    grads: MaskGrads = collect_mask_grads(
        model, parts, sample, logits_fn, batch_size=batch_size, device=device
    )
    timings["fisher"] = time.perf_counter() - t0
    hf, nf = grads.head_fisher(), grads.neuron_fisher()
    fm = JointFlops(
        seq_len=sample.mean_tokens,
        hidden=adapter.hidden_size(model.config),
        head_dim=parts[0].head_dim,
        heads=tuple(p.n_heads for p in parts),
        neurons=tuple(p.w2.in_features for p in parts),
    )
    t0 = time.perf_counter()
    found = search_masks(hf, nf, fm, c)
    timings["search"] = time.perf_counter() - t0
    hm, nm = found.head_masks, found.neuron_masks
    loss_before = sum(
        pruned_loss(g, ~m) for g, m in zip(grads.heads + grads.neurons, hm + nm, strict=True)
    )
    t0 = time.perf_counter()
    if rearrange:
        hm = [rearrange_layer(m, g) for m, g in zip(hm, grads.heads, strict=True)]
        nm = [rearrange_layer(m, g) for m, g in zip(nm, grads.neurons, strict=True)]
    timings["rearrange"] = time.perf_counter() - t0
    loss_after = sum(
        pruned_loss(g, ~m) for g, m in zip(grads.heads + grads.neurons, hm + nm, strict=True)
    )
    t0 = time.perf_counter()
    if tune:
        tinfo = tune_masks(model, parts, sample, hm, nm, batch_size=batch_size, device=device)
        head_scales, neuron_scales = tinfo.head_scales, tinfo.neuron_scales
    else:
        tinfo = None
        head_scales = [None] * len(parts)
        neuron_scales = [None] * len(parts)
    timings["tune"] = time.perf_counter() - t0
    info = {
        "uses_labels": True,
        "labelled_examples": sample.n_sequences,
        "dense_task_loss": grads.loss,
        "heads_kept": found.n_heads,
        "heads_total": sum(fm.heads),
        "heads_kept_per_layer": [int(m.sum()) for m in hm],
        "neurons_kept": found.n_neurons,
        "kept_fisher_search": found.kept_fisher,
        "fisher_loss_estimate_before_rearrange": loss_before,
        "fisher_loss_estimate_after_rearrange": loss_after,
        "flops_joint": {
            "per_head": fm.per_head,
            "per_neuron": fm.per_neuron,
            "before": fm.total(),
            "after": fm.total(found.n_heads, found.n_neurons),
            "ratio": fm.total(found.n_heads, found.n_neurons) / fm.total(),
            "target": c,
        },
        "tuning_stopped": tinfo.stopped_at if tinfo is not None else None,
        "tuning_ffn_error_before": tinfo.error_before if tinfo is not None else None,
        "tuning_ffn_error_after": tinfo.error_after if tinfo is not None else None,
        "timings_s": timings,
    }
    return KwonSelection(hm, nm, head_scales, neuron_scales, info)


@torch.no_grad()
def apply_masked(model: nn.Module, adapter: FFNAdapter, sel: KwonSelection) -> nn.Module:
    """Fold the selection into ``model`` in place without changing shapes: pruned W_O head
    slices and W2 columns zeroed, kept ones multiplied by their tuned mask values. This is the
    masked reference the physically pruned model must equal."""
    for p, hm, hs, nm, ns in zip(
        layer_parts(model, adapter),
        sel.head_masks,
        sel.head_scales,
        sel.neuron_masks,
        sel.neuron_scales,
        strict=True,
    ):
        col = torch.zeros(p.n_heads, dtype=p.w_o.weight.dtype, device=p.w_o.weight.device)
        col[hm.to(col.device)] = 1.0 if hs is None else hs.to(col.device, col.dtype)
        p.w_o.weight.mul_(col.repeat_interleave(p.head_dim).unsqueeze(0))
        coln = torch.zeros(nm.numel(), dtype=p.w2.weight.dtype, device=p.w2.weight.device)
        coln[nm.to(coln.device)] = 1.0 if ns is None else ns.to(coln.device, coln.dtype)
        p.w2.weight.mul_(coln.unsqueeze(0))
    return model


class Kwon(Method):
    """The labelled anchor (see the module docstring). USES LABELS: ``labels=`` aligned with
    ``data``; the task loss needs logits: a model with a task head, or ``classifier=``."""

    name = "kwon"
    needs_labels = True
    selects_heads = True  # its own heads (the shared heads stage is skipped)
    default_reconstruct = "none"  # its own mask tuning is its reconstruction

    def select(self, ctx) -> Selection:
        o = ctx.options
        if ctx.sample.labels is None:
            raise ValueError("method 'kwon' uses labels: pass labels= aligned with data")
        fn = head_logits_fn(o.classifier) if o.classifier is not None else default_logits_fn
        sel = select_kwon(
            ctx.teacher,
            ctx.adapter,
            ctx.sample,
            o.flops,
            fn,
            batch_size=o.batch_size,
            device=ctx.device,
            rearrange=o.experimental.kwon_rearrange,
            tune=o.experimental.kwon_tune,
        )
        return Selection(
            masks=sel.neuron_masks,
            head_masks=sel.head_masks,
            scales=sel.neuron_scales,
            head_scales=sel.head_scales,
            info=sel.info,
        )
