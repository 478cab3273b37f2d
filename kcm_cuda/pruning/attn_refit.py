"""O refit: after heads are removed, a label-free ridge least-squares refit of each pruned
layer's attention output projection O (its kept columns and its bias), bottom-up.

The attention sublayer of every supported family is LN(O·ctx + b_O + h), h the block input.
For layer l, on the reconstruction sample's real tokens, with the teacher (unpruned) and the
student (heads removed, layers below already refit) each run on its own hidden states:
    X = [ctx_s, 1]                        student O input (kept heads' contexts) and a 1
    Z = (W_O,t·ctx_t + b_O,t + h_t) − h_s  the teacher's pre-LN attention output, residual-corrected
    Θ = argmin Σ_t ||Θᵀx(t) − z(t)||² + λ'||Θ − Θ₀||²,   Θ₀ = [W_O kept columns, b_O]ᵀ
      = (XᵀX + λ'I)⁻¹ (XᵀZ + λ'Θ₀),   λ' = λ · mean(diag XᵀX)
(the same residual-corrected target Scale uses for the FFN). Only layers that lost heads are
refit. The pass runs on the heads-pruned student with its FFNs unpruned; the FFN
reconstruction runs after it, on the refit attention. A layer whose solve fails or does not
lower the sample error keeps Θ₀. An O without a bias (the LLaMA family) is refit without
one: X = ctx_s, Θ = the weights only, so the saved model needs no new parameter. The decoder
blocks (pre-norm: h + O·ctx, then the MLP on its own norm) have the same residual-corrected
target without the LayerNorm. Padding is excluded (the sample's attention mask; causal
samples are right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.blockwise import capture_block_inputs, run_block
from kcm_cuda.pruning.data import TokenizedSample


@dataclass
class ORefitResult:
    refit: list[bool] = field(default_factory=list)  # per layer: O was refit
    error_before: list[float] = field(default_factory=list)  # Σ_t ||Θ₀ᵀx − z||²
    error_after: list[float] = field(default_factory=list)
    target_energy: list[float] = field(default_factory=list)  # Σ_t ||z||²


class _OTap:
    def __init__(self, o: nn.Linear) -> None:
        self.ctx: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.handle = o.register_forward_hook(self._hook)

    def _hook(self, _m, args, out):
        self.ctx = real_tokens(args[0], self.mask).double()
        self.out = real_tokens(out, self.mask).double()


@torch.no_grad()
def refit_attention_output(
    teacher: nn.Module,
    student: nn.Module,
    adapter: FFNAdapter,
    head_masks: list[torch.Tensor],
    sample: TokenizedSample,
    *,
    lam: float = 0.01,
    batch_size: int = 32,
    device: torch.device,
) -> ORefitResult:
    """Refit, in place, the O of every layer of ``student`` (its heads already removed per
    ``head_masks``) that lost heads."""
    calls, h_t = capture_block_inputs(teacher, adapter, sample, batch_size)
    h_s = [h.clone() for h in h_t]
    res = ORefitResult()
    t_blocks, s_blocks = adapter.layers(teacher), adapter.layers(student)
    for layer, (tb, sb) in enumerate(zip(t_blocks, s_blocks, strict=True)):
        pruned = not bool(head_masks[layer].all())
        t_next: list[torch.Tensor | None] = [None] * len(calls)
        if pruned:
            o_s = adapter.o(sb)
            w = o_s.in_features
            d = o_s.out_features
            has_bias = o_s.bias is not None
            n = w + 1 if has_bias else w
            G = torch.zeros(n, n, dtype=torch.float64, device=device)
            R = torch.zeros(n, d, dtype=torch.float64, device=device)
            zz = torch.zeros((), dtype=torch.float64, device=device)
            t_tap, s_tap = _OTap(adapter.o(tb)), _OTap(o_s)
            try:
                for b, call in enumerate(calls):
                    t_tap.mask = s_tap.mask = call.mask
                    t_next[b] = run_block(tb, call, h_t[b])  # the teacher's output: kept
                    run_block(sb, call, h_s[b])  # recomputed below, after the refit
                    diff = real_tokens(h_t[b] - h_s[b], call.mask).double()
                    Z = t_tap.out + diff
                    X = s_tap.ctx
                    if has_bias:
                        X = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)
                    X, Z = X.to(device), Z.to(device)
                    G += X.t() @ X
                    R += X.t() @ Z
                    zz += (Z * Z).sum()
            finally:
                t_tap.handle.remove()
                s_tap.handle.remove()
            theta0 = o_s.weight.detach().double().t().to(device)
            if has_bias:
                theta0 = torch.cat([theta0, o_s.bias.detach().double().to(device).unsqueeze(0)])
            lam_abs = lam * float(G.diagonal().mean())
            err0 = _error(G, R, zz, theta0)
            theta = None
            try:
                A = G + lam_abs * torch.eye(n, dtype=G.dtype, device=G.device)
                theta = torch.linalg.solve(A, R + lam_abs * theta0)
            except RuntimeError:
                theta = None
            ok = theta is not None and bool(torch.isfinite(theta).all())
            err1 = _error(G, R, zz, theta) if ok else err0
            ok = ok and err1 < err0
            if ok:
                o_s.weight.copy_(theta[:w].t().to(o_s.weight.device, o_s.weight.dtype))
                if has_bias:
                    o_s.bias.copy_(theta[w].to(o_s.bias.device, o_s.bias.dtype))
            res.refit.append(ok)
            res.error_before.append(err0)
            res.error_after.append(err1 if ok else err0)
            res.target_energy.append(float(zz))
        else:
            res.refit.append(False)
            res.error_before.append(float("nan"))
            res.error_after.append(float("nan"))
            res.target_energy.append(float("nan"))
        for b, call in enumerate(calls):
            h_t[b] = t_next[b] if t_next[b] is not None else run_block(tb, call, h_t[b])
            h_s[b] = run_block(sb, call, h_s[b])
    return res


def _error(G: torch.Tensor, R: torch.Tensor, zz: torch.Tensor, theta: torch.Tensor) -> float:
    """Σ_t ||θᵀx − z||² from the accumulated XᵀX, XᵀZ, Σ||z||²."""
    return float((theta * (G @ theta)).sum() - 2 * (theta * R).sum() + zz)
