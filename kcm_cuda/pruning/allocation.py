"""Layer allocation: how many FFN neurons each layer keeps under one global budget.

A score-based method ranks the neurons inside each layer; ``allocation=`` decides the
per-layer counts k_l (Σ k_l = the FLOPs budget's neuron count, k_l ≥ min_keep):

  global        one global sort of the method's own scores (their cross-layer scale decides;
                for kcm / d2 the votes are cast with width-proportional quotas, so this is
                near-uniform by construction)
  standardised  scores standardised per layer, (s − mean) / std, then one global sort
                (FLAP's rule applied to any method)
  uniform       every layer keeps its width-proportional share (largest remainder); what
                the default ``"auto"`` picks under the ridge refit (PruneOptions)
  error         counts that minimise the sum over layers of each layer's measured output
                error: removing the m lowest-scored neurons of layer l costs
                err_l(m) = 1ᵀ (Σ_l ∘ W2ᵀW2)_{PP} 1 / E‖x_l‖², with P those m neurons, Σ_l the
                (token) covariance of the layer's activations (with bias compensation, which
                removes the pruned neurons' mean) or their second moment (without), and
                E‖x_l‖² the energy of the FFN's input (the LayerNorm'd residual stream it
                adds to), so that errors of different layers are in comparable units. Every
                FFN neuron costs the same FLOPs, so "marginal error per FLOP" is marginal
                error per neuron; the curves are replaced by their lower convex envelopes and
                the neurons with the smallest marginal errors are removed first, which is the
                exact optimum of the convexified problem. Needs the (n × n) activation Gram of
                each layer: the activation pass computes each layer's curve while that layer's
                Gram is at hand and drops it (``layer_error_curve``), so one Gram exists at a
                time (a score whose within-layer order needs every layer keeps them all).

Within a layer the kept neurons are always the method's best-scored ones.
"""

from __future__ import annotations

import torch

from kcm_cuda.pruning.masks import global_topk

ALLOCATIONS = ("global", "standardised", "uniform", "error")


def standardise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (s − mean) / std (unbiased std); a constant layer becomes all 0."""
    out = []
    for s in scores:
        s = s.detach().double().cpu()
        std = s.std() if s.numel() > 1 else torch.zeros((), dtype=torch.float64)
        out.append((s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s))
    return out


def _check_budget(sizes: list[int], k_total: int, keep_min: list[int]) -> None:
    if len(keep_min) != len(sizes):
        raise ValueError(f"min_keep has {len(keep_min)} entries for {len(sizes)} layers")
    if any(m > n for m, n in zip(keep_min, sizes, strict=True)):
        raise ValueError(f"min_keep {keep_min} exceeds the layer sizes {sizes}")
    if not sum(keep_min) <= k_total <= sum(sizes):
        raise ValueError(
            f"cannot keep {k_total} neurons out of {sum(sizes)} with min_keep {keep_min}"
        )


def proportional_counts(sizes: list[int], k_total: int, keep_min: list[int]) -> list[int]:
    """Width-proportional counts summing exactly to ``k_total`` (largest remainder), each
    within [keep_min, size]."""
    _check_budget(sizes, k_total, keep_min)
    total = sum(sizes)
    exact = [k_total * n / total for n in sizes]
    counts = [min(n, max(m, int(e))) for e, n, m in zip(exact, sizes, keep_min, strict=True)]
    # hand out (or take back) the remainder, largest fractional part first
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    while sum(counts) < k_total:
        for i in order:
            if sum(counts) < k_total and counts[i] < sizes[i]:
                counts[i] += 1
    while sum(counts) > k_total:
        for i in reversed(order):
            if sum(counts) > k_total and counts[i] > keep_min[i]:
                counts[i] -= 1
    return counts


def masks_from_counts(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Per layer, the ``counts[l]`` best-scored neurons (stable: ties by index)."""
    masks = []
    for s, k in zip(scores, counts, strict=True):
        s = s.detach().double().cpu()
        if not bool(torch.isfinite(s).all()):
            raise ValueError("neuron scores contain NaN or Inf")
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[torch.sort(s, descending=True, stable=True).indices[:k]] = True
        masks.append(m)
    return masks


def removal_error_curve(
    second_moment: torch.Tensor, w2: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """err(m), m = 0..n: 1ᵀ (S ∘ W2ᵀW2)_{PP} 1 for P = the first m neurons of ``order``
    (= E‖W2[:, P] a_P‖² when S = E[a aᵀ]); float64 (n + 1,)."""
    n = int(order.numel())
    if second_moment.shape != (n, n) or w2.shape[1] != n:
        raise ValueError(
            f"shapes do not match: S {tuple(second_moment.shape)}, W2 {tuple(w2.shape)}, "
            f"{n} neurons"
        )
    dev = second_moment.device
    order = order.to(dev)
    w = w2.detach().to(dev, torch.float64)[:, order]
    M = second_moment.double()[order][:, order] * (w.t() @ w)
    cum = M.cumsum(0).cumsum(1)
    zero = torch.zeros(1, dtype=torch.float64, device=dev)
    return torch.cat([zero, torch.diagonal(cum).clone()])


def convex_marginals(curve: torch.Tensor) -> torch.Tensor:
    """The per-step increments of the lower convex envelope of ``curve`` (points (m, c_m));
    nondecreasing, (n,), summing to curve[-1] − curve[0]."""
    c = curve.double().tolist()
    hull: list[int] = []
    for i in range(len(c)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a → i
            if (c[b] - c[a]) * (i - a) >= (c[i] - c[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    out = torch.empty(len(c) - 1, dtype=torch.float64)
    for a, b in zip(hull[:-1], hull[1:], strict=True):
        out[a:b] = (c[b] - c[a]) / (b - a)
    return out


def error_counts(
    marginals: list[torch.Tensor], sizes: list[int], k_total: int, keep_min: list[int]
) -> list[int]:
    """Remove Σ n_l − k_total neurons, the smallest marginal errors first (per layer at most
    n_l − keep_min_l, in the layer's own order); returns the kept counts."""
    _check_budget(sizes, k_total, keep_min)
    remove = sum(sizes) - k_total
    parts, owner = [], []
    for li, (mg, n, m) in enumerate(zip(marginals, sizes, keep_min, strict=True)):
        if mg.numel() != n:
            raise ValueError(f"layer {li}: {mg.numel()} marginal errors for {n} neurons")
        parts.append(mg.double()[: n - m])
        owner.append(torch.full((n - m,), li, dtype=torch.long))
    flat = torch.cat(parts)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("layer reconstruction errors contain NaN or Inf")
    who = torch.cat(owner)
    # the envelope's increments are nondecreasing inside a layer, so the `remove` smallest
    # (stable sort) are a prefix of each layer's removal order
    chosen = who[torch.sort(flat, stable=True).indices[:remove]]
    removed = torch.bincount(chosen, minlength=len(sizes)).tolist()
    return [n - r for n, r in zip(sizes, removed, strict=True)]


def error_allocation(
    scores: list[torch.Tensor],
    grams: list[torch.Tensor],
    means: list[torch.Tensor],
    n_tokens: int,
    w2: list[torch.Tensor],
    input_energy: list[float],
    k_total: int,
    keep_min: list[int],
    *,
    centered: bool,
) -> tuple[list[int], list[torch.Tensor]]:
    """Per-layer kept counts by measured error (see the module doc), and each layer's error
    curve err_l(m) / E‖x_l‖² (m neurons removed, in score order)."""
    if n_tokens < 1:
        raise ValueError("the error allocation needs at least one token")
    curves = [
        layer_error_curve(s, g, mu, n_tokens, w, e, centered=centered)
        for s, g, mu, w, e in zip(scores, grams, means, w2, input_energy, strict=True)
    ]
    return counts_from_curves(curves, k_total, keep_min), curves


def layer_error_curve(
    scores: torch.Tensor,
    gram: torch.Tensor,
    mean: torch.Tensor,
    n_tokens: int,
    w2: torch.Tensor,
    input_energy: float,
    *,
    centered: bool,
) -> torch.Tensor:
    """One layer's err(m) / E‖x‖² (m lowest-scored neurons removed), computed where ``gram``
    is (the activation pass hands each layer's Gram here and drops it: one at a time)."""
    if n_tokens < 1:
        raise ValueError("the error allocation needs at least one token")
    S = gram.double() / n_tokens
    if centered:
        mu = mean.double().to(S.device)
        S = S - torch.outer(mu, mu)
    order = torch.sort(scores.detach().double().cpu(), descending=False, stable=True).indices
    return removal_error_curve(S, w2, order).cpu() / max(float(input_energy), 1e-30)


def counts_from_curves(
    curves: list[torch.Tensor], k_total: int, keep_min: list[int]
) -> list[int]:
    """Per-layer kept counts that remove the neurons of the smallest convexified marginal
    errors first (see the module doc)."""
    sizes = [int(c.numel()) - 1 for c in curves]
    return error_counts([convex_marginals(c) for c in curves], sizes, k_total, keep_min)


def allocate(
    scores: list[torch.Tensor],
    k_total: int,
    keep_min: list[int],
    allocation: str = "global",
    *,
    counts: list[int] | None = None,
) -> list[torch.Tensor]:
    """Masks under ``allocation`` ("error" needs the ``counts`` from :func:`error_allocation`)."""
    sizes = [int(s.numel()) for s in scores]
    if allocation == "global":
        return global_topk(scores, k_total, keep_min)
    if allocation == "standardised":
        return global_topk(standardise(scores), k_total, keep_min)
    if allocation == "uniform":
        return masks_from_counts(scores, proportional_counts(sizes, k_total, keep_min))
    if allocation == "error":
        if counts is None:
            raise ValueError("allocation='error' needs the per-layer counts (error_allocation)")
        if sum(counts) != k_total or any(
            not m <= c <= n for c, m, n in zip(counts, keep_min, sizes, strict=True)
        ):
            raise ValueError(f"counts {counts} do not fit k={k_total}, min_keep {keep_min}")
        return masks_from_counts(scores, counts)
    raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


# Reconstructions that remove the pruned neurons' mean (so the error that is left is their
# covariance); the others leave the full second moment.
CENTERED_RECONSTRUCTIONS = ("bias", "ridge")


def curve_key(method: str, centered: bool) -> tuple[str, str, bool]:
    """Where the activation pass files a method's error curve (ActivationStats.from_grams)."""
    return ("error_curve", method, bool(centered))


def allocate_for(ctx, scores: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Masks under ``ctx.options.allocation`` for a method's ``scores``, and a JSON-able
    summary for the report (the counts; with "error", each layer's predicted relative
    error at its count)."""
    from kcm_cuda.pruning.activations import token_means

    o = ctx.options
    info: dict = {"allocation": o.allocation}
    if o.layout == "standard":  # every layer alike (layout.py)
        from kcm_cuda.pruning.layout import equal_counts

        counts = equal_counts(ctx.sizes, ctx.k_total, ctx.keep_min)
        info["allocation"] = "equal (layout='standard')"
        return masks_from_counts(scores, counts), info
    if o.allocation != "error":
        return allocate(scores, ctx.k_total, ctx.keep_min, o.allocation), info
    stats = ctx.activation_stats()
    centered = o.reconstruction() in CENTERED_RECONSTRUCTIONS
    key = curve_key(o.method, centered)
    n = stats.n_tokens
    layers = range(len(scores))
    if stats.from_grams is not None and all(key in stats.from_grams.get(i, {}) for i in layers):
        # computed layer by layer in the activation pass (no Gram held for every layer)
        curves = [stats.from_grams[i][key] for i in layers]
        counts = counts_from_curves(curves, ctx.k_total, ctx.keep_min)
    else:
        if stats.grams is None or stats.input_sq is None or stats.sums is None:
            raise ValueError(
                "allocation='error' needs activation Grams (collected with grams=True)"
            )
        from kcm_cuda.pruning.blockwise import map_blocks

        w2 = map_blocks(
            ctx.teacher, ctx.adapter, lambda b: ctx.adapter.w2(b).weight.detach().clone()
        )
        counts, curves = error_allocation(
            scores,
            stats.grams,
            token_means(stats),
            n,
            w2,
            [e / max(n, 1) for e in stats.input_sq],
            ctx.k_total,
            ctx.keep_min,
            centered=centered,
        )
    masks = allocate(scores, ctx.k_total, ctx.keep_min, "error", counts=counts)
    info["error_centered"] = centered
    info["predicted_relative_error"] = [
        float(c[n_l - k]) for c, n_l, k in zip(curves, ctx.sizes, counts, strict=True)
    ]
    return masks, info
