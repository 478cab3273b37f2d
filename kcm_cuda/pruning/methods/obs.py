"""obs: structured Optimal Brain Surgeon selection that knows the refit (as ZipLM / OBC do
for structured pruning), FFN neurons.

The ridge refit replaces a layer's kept W2 columns (and its bias) by the least-squares fit of
the layer's output. The error that refit leaves when the neurons P are removed is

    err(P) = tr( W2_P (Σ / K)_PP W2_Pᵀ )      Σ = Cov_tokens(a) + λ I,  K = the kept neurons,

the conditional covariance of the removed activations given the kept ones (the Schur
complement), so a neuron that the kept ones can stand in for costs nothing, whatever its
own energy. FLAP's and Wanda-sp's scores look at one neuron at a time and cannot see that.

Per layer the removal order is greedy in blocks (``OBS_STEPS`` = 32 exact block steps): at
each step the neurons with the smallest single-removal cost ‖W[:, j]‖² / (Σ⁻¹)_jj (W the
current, already compensated weights) are removed together, W and Σ⁻¹ get the exact block
update, and the step's exact cost tr(W_B (Σ⁻¹_BB)⁻¹ W_Bᵀ) is added to the layer's error curve.
The curves, relative to each layer's FFN-input energy E‖x‖² (the units
``allocation="error"`` uses), decide the layer widths: convex envelopes, the smallest marginal
errors removed first (``allocation.error_counts``). With ``allocation="uniform"`` the widths
are width-proportional and only the order inside each layer is OBS's.

Needs each layer's (n × n) activation Gram (collected in the activation pass) and O(n³)
float64 work per layer on the CPU.
"""

from __future__ import annotations

import torch

from kcm_cuda.pruning.activations import token_means
from kcm_cuda.pruning.allocation import convex_marginals, error_counts, proportional_counts
from kcm_cuda.pruning.methods.base import Method, Selection

OBS_STEPS = 32  # exact block steps per layer (1 = one-shot, n = fully greedy; 128 took 5x longer)
DAMPING = 0.01  # λ relative to the mean diagonal of the covariance (as the ridge refit's)
OBS_ALLOCATIONS = ("global", "error", "uniform")  # global = error: OBS's own widths


def damped_covariance(
    gram: torch.Tensor, mean: torch.Tensor, n_tokens: int, damping: float = DAMPING
) -> torch.Tensor:
    """Cov = Σ a aᵀ / N − μ μᵀ (float64) plus ``damping`` × mean(diag) on the diagonal (a
    floor for dead neurons: a layer whose covariance is 0 gets the identity)."""
    if n_tokens < 1:
        raise ValueError("the OBS selection needs at least one token")
    n = int(mean.numel())
    if gram.shape != (n, n):
        raise ValueError(f"Gram of shape {tuple(gram.shape)} for {n} neurons")
    mu = mean.double().cpu()
    cov = gram.double().cpu() / n_tokens - torch.outer(mu, mu)
    cov = 0.5 * (cov + cov.t())
    scale = float(torch.diagonal(cov).clamp_min(0).mean())
    lam = damping * scale if scale > 0 else 1.0
    return cov + lam * torch.eye(n, dtype=torch.float64)


def _inverse(h: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("the damped activation covariance is not positive definite")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    li = torch.linalg.solve_triangular(chol, eye, upper=False)  # L⁻¹ (faster here than
    inv = li.t() @ li  # cholesky_inverse on the CPU)
    return 0.5 * (inv + inv.t())


def removal_order(
    cov: torch.Tensor, w2: torch.Tensor, *, steps: int = OBS_STEPS, keep_last: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS removal order of a layer's neurons and its error curve.

    cov: (n, n) damped covariance; w2: (d, n) the layer's output weights. Returns ``order``
    (n,) long, the neurons in removal order (the last ``keep_last`` are never removed and
    come last, best first removed last), and ``curve`` (n + 1,) float64: curve[m] = the refit
    error after removing the first m (exact at each block boundary, linear in between).
    """
    n = int(cov.shape[0])
    if cov.shape != (n, n) or w2.dim() != 2 or w2.shape[1] != n:
        raise ValueError(f"shapes do not match: cov {tuple(cov.shape)}, W2 {tuple(w2.shape)}")
    keep_last = max(0, min(int(keep_last), n))
    # the state is kept compact, over the neurons still alive: their original indices, the
    # compensated weights W (d × m) and the inverse covariance of the alive ones (m × m)
    alive = torch.arange(n)
    W = w2.detach().double().cpu().clone()
    hinv = _inverse(cov.double().cpu())
    order: list[int] = []
    curve = [0.0]
    to_remove = n - keep_last
    per_step = max(1, -(-to_remove // max(1, int(steps))))
    while len(order) < to_remove:
        cost = (W**2).sum(0) / torch.diagonal(hinv).clamp_min(1e-300)
        b = min(per_step, to_remove - len(order))
        rank = torch.sort(cost, stable=True).indices
        pick, rest = rank[:b], torch.sort(rank[b:]).values
        h_bb = hinv[pick][:, pick]
        try:
            inv_bb = torch.linalg.inv(h_bb)
        except RuntimeError:  # numerically singular block: remove one neuron this step
            pick, rest = rank[:1], torch.sort(rank[1:]).values
            h_bb = hinv[pick][:, pick]
            inv_bb = 1.0 / h_bb
        wb = W[:, pick]
        step_cost = float(((wb @ inv_bb) * wb).sum())
        h_br = hinv[pick][:, rest]  # (b, m − b)
        gain = inv_bb @ h_br
        W = W[:, rest] - wb @ gain
        hinv = hinv[rest][:, rest] - h_br.t() @ gain
        hinv = 0.5 * (hinv + hinv.t())
        k = int(pick.numel())
        start = curve[-1]
        curve.extend(start + max(step_cost, 0.0) * (i + 1) / k for i in range(k))
        order.extend(alive[pick].tolist())
        alive = alive[rest]
    if alive.numel():  # the never-removed: least important (by the last costs) first
        cost = (W**2).sum(0) / torch.diagonal(hinv).clamp_min(1e-300)
        order.extend(alive[torch.sort(cost, stable=True).indices].tolist())
        curve.extend([curve[-1]] * int(alive.numel()))  # not reachable (keep_last)
    return torch.tensor(order, dtype=torch.long), torch.tensor(curve, dtype=torch.float64)


def masks_from_order(orders: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Per layer keep all but the first n − k neurons of its removal order."""
    masks = []
    for order, k in zip(orders, counts, strict=True):
        n = int(order.numel())
        m = torch.ones(n, dtype=torch.bool)
        m[order[: n - k]] = False
        masks.append(m)
    return masks


class OBS(Method):
    name = "obs"
    needs_activations = True
    needs_grams = True

    def check_options(self, options) -> None:
        if options.allocation not in OBS_ALLOCATIONS:
            raise ValueError(
                "method='obs' decides its own layer widths (allocation='global' or 'error') "
                f"or takes uniform ones (allocation='uniform'), got {options.allocation!r}"
            )

    def select(self, ctx) -> Selection:
        from kcm_cuda.pruning.blockwise import map_blocks

        o = ctx.options
        self.check_options(o)
        stats = ctx.activation_stats()
        if stats.grams is None or stats.input_sq is None:
            raise ValueError("method='obs' needs activation Grams (collected with grams=True)")
        n_tok = stats.n_tokens
        means = token_means(stats)
        w2 = map_blocks(
            ctx.teacher, ctx.adapter, lambda b: ctx.adapter.w2(b).weight.detach().cpu().clone()
        )
        orders, curves = [], []
        for g, mu, w, m in zip(stats.grams, means, w2, ctx.keep_min, strict=True):
            order, curve = removal_order(damped_covariance(g, mu, n_tok), w, keep_last=m)
            orders.append(order)
            curves.append(curve)
        energies = [max(e / max(n_tok, 1), 1e-30) for e in stats.input_sq]
        relative = [c / e for c, e in zip(curves, energies, strict=True)]
        if o.allocation == "uniform":
            counts = proportional_counts(ctx.sizes, ctx.k_total, ctx.keep_min)
        else:
            marginals = [convex_marginals(c) for c in relative]
            counts = error_counts(marginals, ctx.sizes, ctx.k_total, ctx.keep_min)
        masks = masks_from_order(orders, counts)
        info = {
            "allocation": "uniform" if o.allocation == "uniform" else "obs_error",
            "kept_per_layer": counts,
            "predicted_relative_error": [
                float(c[n - k]) for c, n, k in zip(relative, ctx.sizes, counts, strict=True)
            ],
        }
        return Selection(masks=masks, info=info)
