"""The reconstruction stage: the teacher (the unpruned model) and a selection → the physically
pruned student, each layer's kept W2 (and b2) refitted so that the layer's output matches the
teacher's. Label-free, gradient-free, bottom-up.

For layer l, on the reconstruction sample's real tokens (T of them), with a = the student's
activations (``reconstruct_mode="sequential"``: the student's own inputs, its lower layers
already pruned and refitted; ``"oneshot"``: the teacher's, all layers at once), k the kept
neurons, x the FFN's residual input:
    Y = (teacher W2·a_t + x_t) − x_s          (Scale's residual-corrected target, bias-free)
    find W2', b2' with W2' a_k + b2' ≈ Y + b2.
Variants (``reconstruct=``):
  "none"   W2' = W2ₖ, b2' = b2 (a selection's own per-neuron scales are applied)
  "bias"   FLAP's bias compensation: b2' = b2 + W2[:, pruned]·mean_t(a_pruned)
  "scale"  Scale: W2' = W2ₖ diag(m) (kcm_cuda.pruning.scale.solve_with_retries), b2' = b2
  "ridge"  min Σ_t ||W2' a_k + b2' − (Y + b2)||² + λ'||W2' − W2ₖ||²  (b2 not penalised),
           one (k+1)×(k+1) system on the augmented design [a_k, 1] shared by all d outputs,
           λ' = ``ridge_lambda`` × mean(diag(A_kᵀA_k)).
All variants read the same statistics, accumulated in float64 over token batches:
G = ZᵀZ, C = ZᵀY (Z = [A_k, 1]) and ΣYᵀY — so each variant's in-sample error
Σ_t ||ZΘ − Y||² (Θ = [W2'ᵀ; (b2' − b2)ᵀ]) is reported against plain pruning's.
A solve that fails (not finite, or raising the in-sample error) falls back to plain pruning
for that layer, and the report says so.

:class:`LinearRefit` is the general piece: it refits any Linear from its kept input columns,
its inputs and its target (also usable for an attention output projection).

Heads (``Selection.head_masks``): the pruned heads are removed from the student first, so every
variant reconstructs the FFNs on the heads-pruned attention. With ``head_refit`` (and a
reconstruction other than "none") each layer that lost heads first has its attention output
projection O refit by the same ridge (:class:`LinearRefit`), inside the same bottom-up loop:
the attention sublayer of every supported family adds O·ctx + b_O to the block input h, so
    X = ctx_s (the kept heads' contexts; sequential: the student's, one-shot: the teacher's)
    Z = (O_t·ctx_t + b_O + h_t) − h_s − b_O  (the teacher's pre-norm attention output,
                                           residual-corrected, minus the current bias)
and O's kept columns (and its bias, where it has one: the LLaMA family's O has none and is
refit without) are refit with b_O unpenalised, λ' relative to the mean diagonal of XᵀX. Then
that layer's FFN is refit on the refit attention. The teacher's block runs once per layer
(its FFN target is kept from the O pass); the student's runs once more on those layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.blockwise import (
    block_device,
    capture_block_inputs,
    detached_copy,
    executing,
    hidden_store,
    is_placeholder,
    run_block,
    set_block,
    skeleton_copy,
)
from kcm_cuda.pruning.layout import refit_bias
from kcm_cuda.pruning.methods.base import Selection
from kcm_cuda.pruning.physical import (
    check_masks,
    prune_heads_in_place,
    prune_in_place,
    record_mlp_bias,
    record_sizes,
)
from kcm_cuda.pruning.progress import progress_bar
from kcm_cuda.pruning.safety import finite_refit
from kcm_cuda.pruning.scale import _Tap, solve_with_retries


@dataclass
class ReconstructionResult:
    """Per layer: fallback (the refit failed and the plain pruned layer was kept), the
    relative λ used, the error Σ_t ||ΔY||² on the reconstruction sample before (plain
    pruning) and after the refit, and the target energy Σ_t ||Y||²."""

    name: str
    mode: str
    scales: list[torch.Tensor | None]
    fallback: list[bool] = field(default_factory=list)
    lambda_used: list[float] = field(default_factory=list)
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    o_refit: ORefitResult | None = None  # heads pruned + head_refit: the O refit per layer

    def record(self, scales, fell_back: bool, lam: float, err0: float, err1: float, yy) -> None:
        """One layer's refit: its scales (Scale) or None, whether it fell back, λ, the error
        before and after, the target energy."""
        self.scales.append(scales)
        self.fallback.append(bool(fell_back))
        self.lambda_used.append(float(lam))
        self.error_before.append(err0)
        self.error_after.append(err1)
        self.target_energy.append(float(yy))


@dataclass
class ORefitResult:
    """Per layer: O was refit, Σ_t ||O x − z||² before / after, Σ_t ||z||² (NaN: no heads lost)."""

    refit: list[bool] = field(default_factory=list)
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)

    def record(self, fell_back: bool, err0: float, err1: float, yy) -> None:
        """One layer's O refit (a fallback keeps the error before)."""
        self.refit.append(not fell_back)
        self.error_before.append(err0)
        self.error_after.append(err0 if fell_back else err1)
        self.target_energy.append(float(yy))

    def skip(self) -> None:
        self.refit.append(False)
        for v in (self.error_before, self.error_after, self.target_energy):
            v.append(float("nan"))


# -- the general refit of one Linear ------------------------------------------------------------
class LinearRefit:
    """Statistics for refitting a Linear ``y = W x + b`` from its kept input columns.

    ``add(inputs, target)`` per token batch: inputs (t, k) = the kept input columns the
    refitted layer will see, target (t, d) = what ``W' x_k + (b' − b)`` should produce
    (i.e. the desired output minus the current bias). Then ``ridge(W0, lam)`` or
    ``error(W, db)``. ``fit_bias=False``: no bias row (a Linear without bias).
    """

    def __init__(self, k: int, d: int, device: torch.device, fit_bias: bool = True):
        self.k, self.d, self.fit_bias = k, d, fit_bias
        m = k + 1 if fit_bias else k
        self.G = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.C = torch.zeros(m, d, dtype=torch.float64, device=device)
        self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        z = inputs.float()
        if self.fit_bias:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)
        y = target.float()
        self.G += (z.t() @ z).double()
        self.C += (z.t() @ y).double()
        self.yy += (y * y).sum(dtype=torch.float64)
        self.tokens += int(z.shape[0])

    def theta(self, W: torch.Tensor, db: torch.Tensor | None = None) -> torch.Tensor:
        """Θ = [Wᵀ; dbᵀ] ((k[+1]) × d, float64) for W (d, k) and a bias change db (d,)."""
        t = W.t().double().to(self.G.device)
        if self.fit_bias:
            b = torch.zeros(self.d, dtype=torch.float64) if db is None else db.double()
            t = torch.cat([t, b.to(t.device).unsqueeze(0)], dim=0)
        return t

    def error(self, W: torch.Tensor, db: torch.Tensor | None = None) -> float:
        """Σ_t ||W x_k + db − target||² from the statistics."""
        th = self.theta(W, db)
        return float((th * (self.G @ th)).sum() - 2 * (th * self.C).sum() + self.yy)

    def diag_scale(self) -> float:
        k = self.k
        return float(self.G[:k, :k].diagonal().mean()) if k else 0.0

    def ridge(self, W0: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """argmin Σ||W x_k + db − target||² + λ'||W − W0||², λ' = lam · mean diag(XₖᵀXₖ);
        returns (W (d, k), db (d,), fallback). fallback: the solve failed or did not lower the
        error, and (W0, 0) is returned. ``last_errors``: the error of (W0, 0) and of what is
        returned (the solution's from the normal equations: Θᵀ G Θ = Θ·(B − PΘ), no second
        product with G)."""
        k = self.k
        th0 = self.theta(W0)
        err0 = self.error(W0)
        self.last_errors = (err0, err0)
        pen = torch.zeros(self.G.shape[0], dtype=torch.float64, device=self.G.device)
        pen[:k] = lam * self.diag_scale()
        A = self.G.clone()
        A.diagonal().add_(pen)
        B = self.C + pen.unsqueeze(1) * th0
        th = None
        try:
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                th = torch.cholesky_solve(B, L)
        except RuntimeError:
            th = None
        if th is None:
            try:
                th = torch.linalg.lstsq(A.cpu(), B.cpu()).solution.to(A.device)
            except RuntimeError:
                th = None
        zero = torch.zeros(self.d, dtype=torch.float64)
        if th is None or not bool(torch.isfinite(th).all()):
            return W0.double(), zero, True
        W, db = th[:k].t(), (th[k] if self.fit_bias else torch.zeros_like(th[0]))
        quad = (th * (B - pen.unsqueeze(1) * th)).sum()
        err1 = float(quad - 2 * (th * self.C).sum() + self.yy)
        if err1 > err0 * (1 + 1e-6) + 1e-12:
            return W0.double(), zero, True
        self.last_errors = (err0, err1)
        return W.cpu(), db.cpu(), False


def refit_linear(
    linear: nn.Linear,
    keep: torch.Tensor,
    inputs: torch.Tensor,
    target: torch.Tensor,
    lam: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Ridge refit of ``linear`` restricted to its input columns ``keep`` (bool): returns the
    new (d, k) weight, the new bias (None without bias) and whether it fell back.
    ``inputs``: (t, n) the full inputs (only the kept columns are used); ``target``: (t, d) the
    outputs the refitted layer should produce (bias included)."""
    W = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    k = int(keep.sum())
    fit = LinearRefit(k, W.shape[0], W.device, fit_bias=b is not None)
    y = target.float() - (b.float() if b is not None else 0.0)
    fit.add(inputs[:, keep], y)
    W_new, db, fb = fit.ridge(W[:, keep], lam)
    W_new = W_new.to(W.dtype)
    b_new = (b.double() + db.to(b.device)).to(b.dtype) if b is not None else None
    return W_new, b_new, fb


# -- the stage ---------------------------------------------------------------------------------


def _plain(name: str, mode: str, selection: Selection, n_layers: int) -> ReconstructionResult:
    scales = list(selection.scales) if selection.scales is not None else [None] * n_layers
    return ReconstructionResult(name, mode, scales)


def reconstruct(ctx, selection: Selection) -> tuple[nn.Module, ReconstructionResult]:
    """The pruned student (a new module) and what the reconstruction did."""
    o = ctx.options
    name = o.reconstruction()
    masks = selection.masks
    if name == "none":
        if selection.head_masks is None:
            student = pruned_copy(ctx.teacher, ctx.adapter, masks, selection.scales)
        else:
            student = prune_in_place(
                copy.deepcopy(ctx.teacher), ctx.adapter, masks, selection.scales
            )
            _fold_head_scales(student, ctx.adapter, selection)  # kwon's tuned head values
            prune_heads_in_place(student, ctx.adapter, selection.head_masks)
        return student, _plain("none", o.experimental.reconstruct_mode, selection, len(masks))
    # The student is made block by block during the refit (one block at a time on the
    # execution device); with heads pruned, whole first (encoders: the O refit runs on it).
    if selection.head_masks is None:
        student = skeleton_copy(ctx.teacher, ctx.adapter)
    else:
        student = copy.deepcopy(ctx.teacher)
        # Heads first: the FFN reconstruction below then fits the heads-pruned attention.
        _fold_head_scales(student, ctx.adapter, selection)  # kwon's tuned head values
        prune_heads_in_place(student, ctx.adapter, selection.head_masks)
    o_refit = selection.head_masks is not None and o.experimental.head_refit
    res = refit_layers(
        ctx.teacher,
        student,
        ctx.adapter,
        masks,
        ctx.sample if o.scale_samples is None else ctx.sample.subset(o.scale_samples),
        variant=name,
        mode=o.experimental.reconstruct_mode,
        ridge_lambda=o.ridge_lambda,
        scale_lambda=o.experimental.scale_lambda,
        scale_retries=o.experimental.scale_retries,
        batch_size=o.batch_size,
        device=ctx.device,
        progress=o.progress,
        head_masks=selection.head_masks if o_refit else None,
        fit_bias=refit_bias(o, ctx.adapter),
    )
    record_sizes(student, ctx.adapter)
    record_mlp_bias(student, ctx.adapter)
    if selection.scales is not None:
        res.notes.append("the selection's own scales were replaced by the reconstruction")
    return student, res


@torch.no_grad()
def pruned_copy(
    teacher: nn.Module,
    adapter,
    masks: list[torch.Tensor],
    scales: list[torch.Tensor | None] | None = None,
) -> nn.Module:
    """A physically pruned copy of ``teacher`` (no refit), made one block at a time: each
    block is copied where it lives and shrunk before the next is copied."""
    blocks = adapter.layers(teacher)
    check_masks(adapter, blocks, masks)
    student = skeleton_copy(teacher, adapter)
    for i, tb in enumerate(blocks):
        sb = detached_copy(tb)
        adapter.shrink_ffn(sb, masks[i], scales[i] if scales is not None else None)
        set_block(student, adapter, i, sb.to(block_device(tb)))
    record_sizes(student, adapter)
    return student


@torch.no_grad()
def refit_layers(
    teacher: nn.Module,
    student: nn.Module,
    adapter,
    masks: list[torch.Tensor],
    sample,
    *,
    variant: str,
    mode: str = "sequential",
    ridge_lambda: float = 0.01,
    scale_lambda: float = 0.01,
    scale_retries: int = 2,
    batch_size: int = 32,
    device: torch.device,
    progress: bool = True,
    head_masks: list[torch.Tensor] | None = None,
    fit_bias: bool = True,
) -> ReconstructionResult:
    """Refit every layer (see the module docstring); ``student`` (a copy of ``teacher``) is
    physically pruned in place. Sequential: three block passes per layer; one-shot: one.
    ``head_masks``: the student's heads are already removed by these masks; the O of every
    layer that lost heads is refit first (one more student pass on that layer).
    ``fit_bias=False``: the ridge refit fits W2's kept columns alone, no b2 change (a family
    whose stock class has no MLP bias, in the standard layout: kcm_cuda.pruning.layout)."""
    if variant not in ("bias", "scale", "ridge"):
        raise ValueError(f"variant must be 'bias', 'scale' or 'ridge', got {variant!r}")
    if mode not in ("sequential", "oneshot"):
        raise ValueError(f"mode must be 'sequential' or 'oneshot', got {mode!r}")
    seq = mode == "sequential"
    store = hidden_store(teacher, adapter, sample, device)
    calls, h_t = capture_block_inputs(teacher, adapter, sample, batch_size, store=store)
    h_s = [h.clone() for h in h_t] if seq else None
    t_blocks, s_blocks = adapter.layers(teacher), adapter.layers(student)
    res = ReconstructionResult(variant, mode, [], tokens=sample.n_tokens)
    if head_masks is not None:
        res.o_refit = ORefitResult()
    updates = []
    if variant == "bias" and not fit_bias:
        raise ValueError("variant='bias' writes a bias: it needs fit_bias=True")
    # these write a b2 (added where the family has none)
    with_bias = variant in ("bias", "ridge") and fit_bias
    bar = progress_bar(
        range(len(t_blocks)), total=len(t_blocks), desc=variant, enabled=progress, unit="layer"
    )
    for layer in bar:
        with executing(t_blocks[layer], device) as (tb, dev):
            sb = s_blocks[layer]
            lazy = is_placeholder(sb)
            home = block_device(t_blocks[layer])
            if lazy:  # a skeleton student: this block is made now, on the execution device
                sb = detached_copy(tb, dev)
            elif block_device(sb) != dev:
                sb.to(dev)
            keep = masks[layer].to(dev)
            k = int(keep.sum())
            w2 = adapter.w2(tb)
            W2 = w2.weight.detach().float()
            W2k = W2[:, keep]
            fit = LinearRefit(k, W2.shape[0], dev, fit_bias=with_bias or variant == "scale")
            a_sum = torch.zeros(W2.shape[1], dtype=torch.float64, device=dev)
            teacher_pass = None  # the O pass's teacher outputs and FFN targets (sequential)
            if res.o_refit is not None:
                if bool(head_masks[layer].all()):
                    res.o_refit.skip()
                else:
                    teacher_pass = _refit_o(
                        adapter, tb, sb, head_masks[layer], calls, h_t, h_s, dev,
                        float(ridge_lambda), res.o_refit,
                    )
            t_tap = _Tap(adapter, tb, output=True)
            s_tap = _Tap(adapter, sb) if seq else None
            try:
                for b, call in enumerate(calls):
                    mask = call.mask.to(dev)
                    t_tap.mask = mask
                    if teacher_pass is None:
                        h_t[b] = run_block(tb, call, h_t[b], dev)
                        t_yx = t_tap.y + t_tap.x if seq else None
                    else:
                        h_t[b], t_yx = teacher_pass[0][b], teacher_pass[1][b]
                        teacher_pass[0][b] = teacher_pass[1][b] = None
                    if seq:
                        s_tap.mask = mask
                        run_block(sb, call, h_s[b], dev)  # output unused: redone after the refit
                        Y = t_yx - s_tap.x
                        a = s_tap.a
                    else:
                        Y, a = t_tap.y, t_tap.a
                    fit.add(a[:, keep], Y)
                    a_sum += a.sum(dim=0, dtype=torch.float64)
                    t_tap.x = t_tap.y = t_tap.a = None
                    if seq:
                        s_tap.x = s_tap.a = None
            finally:
                t_tap.remove()
                if s_tap is not None:
                    s_tap.remove()
            err0 = fit.error(W2k) if variant != "ridge" else None
            scales = None
            fell_back, lam_used = False, float(ridge_lambda)
            db = torch.zeros(W2.shape[0], dtype=torch.float64)
            if variant == "ridge":
                W_new, db, fell_back = fit.ridge(W2k, float(ridge_lambda))
                err0 = fit.last_errors[0]
            elif variant == "bias":
                lam_used = 0.0
                mean_a = (a_sum / max(fit.tokens, 1)).float()
                db = (W2[:, ~keep] @ mean_a[~keep]).double().cpu()
                W_new = W2k.double()
            else:  # scale
                M = (W2k.t() @ W2k).double() * fit.G[:k, :k]
                r = (fit.C[:k] * W2k.t().double()).sum(dim=1)
                if k > 0:
                    lam = float(scale_lambda)
                    m, fell_back, lam_used = solve_with_retries(M, r, lam, scale_retries)
                else:
                    m, lam_used = torch.ones(0, dtype=torch.float64, device=dev), scale_lambda
                scales = m.float().cpu()
                W_new = W2k.double() * m.unsqueeze(0)
            solved = variant == "ridge" and not fell_back
            W_new, db, fell_back = finite_refit(W_new, db, W2k, fell_back)  # never NaN weights
            if scales is not None and not bool(torch.isfinite(scales).all()):
                scales = torch.ones_like(scales)
            if variant == "ridge" and (solved == (not fell_back)):
                # the ridge's own errors (the solution's, or plain pruning's on a fallback)
                err1 = fit.last_errors[1] if solved else err0
            else:
                err1 = fit.error(W_new, db)
            res.record(scales, fell_back, lam_used, err0, err1, fit.yy)
            update = (keep, W_new, db, with_bias)
            if seq:
                apply_ffn_refit(adapter, sb, *update)
                for b, call in enumerate(calls):
                    h_s[b] = run_block(sb, call, h_s[b], dev)
            else:
                updates.append(update)
            if home != dev:
                sb.to(home)
            if lazy:
                set_block(student, adapter, layer, sb)
    for sb, update in zip(adapter.layers(student), updates, strict=False):
        apply_ffn_refit(adapter, sb, *update)
    if any(res.fallback):
        res.notes.append(
            f"{variant}: plain pruning kept in layer(s) "
            f"{[i for i, f in enumerate(res.fallback) if f]} (solve failed or did not help)"
        )
    return res


class _OTap:
    """A hook on an attention output projection: its input (the head contexts) and output,
    on the real tokens, float64."""

    def __init__(self, o: nn.Linear) -> None:
        self.ctx = self.out = self.mask = None
        self.handle = o.register_forward_hook(self._hook)

    def _hook(self, _m, args, out):
        self.ctx = real_tokens(args[0], self.mask).double()
        self.out = real_tokens(out, self.mask).double()


def _refit_o(adapter, tb, sb, head_mask, calls, h_t, h_s, dev, lam, result: ORefitResult):
    """Refit, in place, the O of student block ``sb`` (its heads already removed by
    ``head_mask``) by ridge to the residual-corrected teacher target (the module docstring).
    Sequential: returns, per batch, the teacher block's output and its FFN target y + x (so the
    FFN refit that follows runs the teacher no more); one-shot: None (nothing to carry)."""
    seq = h_s is not None
    o_t, o_s = adapter.o(tb), adapter.o(sb)
    fit = LinearRefit(o_s.in_features, o_s.out_features, dev, fit_bias=o_s.bias is not None)
    b_o = o_s.bias.detach().double() if o_s.bias is not None else None
    cols = None
    if not seq:  # the kept heads' columns of the teacher's contexts
        d_h = o_t.in_features // head_mask.numel()
        cols = head_mask.to(dev).repeat_interleave(d_h)
    t_otap, s_otap = _OTap(o_t), (_OTap(o_s) if seq else None)
    t_tap = _Tap(adapter, tb, output=True) if seq else None
    outs, yxs = [], []
    try:
        for b, call in enumerate(calls):
            mask = call.mask.to(dev)
            t_otap.mask = mask
            if seq:
                t_tap.mask = s_otap.mask = mask
            out_t = run_block(tb, call, h_t[b], dev)
            if seq:
                run_block(sb, call, h_s[b], dev)  # its output is redone after both refits
                x = s_otap.ctx
                z = t_otap.out + real_tokens(h_t[b] - h_s[b], mask).double()
                outs.append(out_t)
                yxs.append(t_tap.y + t_tap.x)
            else:
                x, z = t_otap.ctx[:, cols], t_otap.out
            if b_o is not None:
                z = z - b_o.to(z.device)
            fit.add(x, z)
    finally:
        t_otap.handle.remove()
        if seq:
            s_otap.handle.remove()
            t_tap.remove()
    W0 = o_s.weight.detach()
    err0 = fit.error(W0)
    W, db, fell_back = fit.ridge(W0, lam)
    W, db, fell_back = finite_refit(W, db, W0.double(), fell_back)
    err1 = fit.error(W, db)
    if not fell_back:
        apply_o_refit(o_s, W, db)
    result.record(fell_back, err0, err1, fit.yy)
    return (outs, yxs) if seq else None


def apply_o_refit(o: nn.Linear, W: torch.Tensor, db: torch.Tensor) -> None:
    """Write a refitted attention output projection: its (kept) weight and the bias change."""
    o.weight.copy_(W.to(o.weight.device, o.weight.dtype))
    if o.bias is not None:
        o.bias.add_(db.to(o.bias.device, o.bias.dtype))


def apply_ffn_refit(
    adapter,
    block: nn.Module,
    keep: torch.Tensor,
    W: torch.Tensor,
    db: torch.Tensor,
    with_bias: bool = True,
):
    """Shrink the block's FFN to ``keep`` and write the refitted W2 and b2 (a family without
    an FFN output bias gets one first, when the variant writes b2)."""
    if with_bias:
        adapter.ensure_w2_bias(block)
    adapter.shrink_ffn(block, keep)
    w2 = adapter.w2(block)
    w2.weight.copy_(W.to(w2.weight.device, w2.weight.dtype))
    if w2.bias is not None:
        w2.bias.add_(db.to(w2.bias.device, w2.bias.dtype))


@torch.no_grad()
def _fold_head_scales(model: nn.Module, adapter, selection: Selection) -> None:
    """Multiply the output-projection columns of each kept head by its factor."""
    if selection.head_scales is None or selection.head_masks is None:
        return
    d_h = adapter.head_size(model.config)
    for block, hm, hs in zip(
        adapter.layers(model), selection.head_masks, selection.head_scales, strict=True
    ):
        if hs is None:
            continue
        o = adapter.o(block)
        col = torch.ones(hm.numel(), dtype=o.weight.dtype, device=o.weight.device)
        col[hm.to(col.device)] = hs.to(col.device, col.dtype)
        o.weight.mul_(col.repeat_interleave(d_h).unsqueeze(0))
