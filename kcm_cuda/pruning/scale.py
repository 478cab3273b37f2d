"""Scale — label-free least-squares rescaling of the kept neurons, layer by layer, bottom-up.

Teacher: the unpruned model. Student: the model whose layers below l are already pruned and
rescaled. For layer l, on the Scale sample's real tokens (T of them):
    A_s = student activations of the kept neurons (T × k)
    Y   = (teacher W2·a_t + teacher residual input) − student residual input     (biases cancel)
    m   = argmin Σ_t ||W2ₖ diag(m) a_s(t) − Y(t)||² + λ'||m − 1||²
solved from the normal equations [(W2ₖᵀW2ₖ) ⊙ (A_sᵀA_s) + λ'I] m = colsum(A_s ⊙ (Y W2ₖ)) + λ'·1
where λ' = λ · mean(diag((W2ₖᵀW2ₖ) ⊙ (A_sᵀA_s))): ``lam`` is relative to the Gram's scale
(the per-token objective grows with T; a relative λ means the same for every sample size)
(two k×k accumulations over token batches; no (T·d) × k design matrix). If any |m_i| > 10 (or
the solve fails) the layer keeps m = 1. Each layer block is run on its own, with the exact
arguments the model passed to it (captured by a hook), on stored hidden states: the whole
procedure costs about three forward passes of the Scale sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.blockwise import capture_block_inputs, run_block
from kcm_cuda.pruning.data import TokenizedSample
from kcm_cuda.pruning.progress import progress_bar

MAX_ABS_SCALE = 10.0


@dataclass
class ScaleResult:
    scales: list[torch.Tensor]  # per layer, (k_l,) float32 (ones where the fallback applied)
    fallback: list[bool]
    lambda_used: list[float]  # the relative λ that gave the layer's m (after retries)
    error_unscaled: list[float]  # Σ_t ||W2ₖ a_s − Y||² with m = 1 (Scale sample)
    error_scaled: list[float]  # same with the chosen m
    target_energy: list[float]  # Σ_t ||Y||²
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


class _Tap:
    """Hooks on one block, on the real tokens: x = W1's input (the FFN's residual input),
    a = W2's input (the activations), and with ``output=True`` y = W2·a (W2's output minus its
    bias, taken from the forward)."""

    def __init__(self, adapter: FFNAdapter, block: nn.Module, output: bool = False):
        self.x = self.a = self.y = self.mask = None
        w2 = adapter.w2(block)
        self.handles = [
            adapter.w1(block).register_forward_pre_hook(self._on_w1),
            w2.register_forward_pre_hook(self._on_w2),
        ]
        if output:
            self.handles.append(w2.register_forward_hook(self._on_w2_out))

    def _on_w1(self, _m, args):
        self.x = real_tokens(args[0], self.mask).float()

    def _on_w2(self, _m, args):
        self.a = real_tokens(args[0], self.mask).float()

    def _on_w2_out(self, module, _args, out):
        y = real_tokens(out, self.mask).float()
        self.y = y - module.bias.float() if module.bias is not None else y

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def solve_scale(M: torch.Tensor, r: torch.Tensor, lam: float) -> tuple[torch.Tensor, bool]:
    """m from (M + λ'I) m = r + λ'·1 with λ' = λ · mean(diag M) (λ relative to the Gram's
    scale, so that one value fits every layer, sample size and model); (m, fallback_used)."""
    k = M.shape[0]
    eye = torch.eye(k, dtype=M.dtype, device=M.device)
    lam = lam * float(M.diagonal().mean()) if k else lam
    A = M + lam * eye
    b = r + lam
    m = None
    try:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            m = torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)
    except RuntimeError:
        m = None
    if m is None:
        try:
            m = torch.linalg.lstsq(A.cpu(), b.cpu().unsqueeze(1)).solution.squeeze(1).to(M.device)
        except RuntimeError:
            m = None
    if m is None or not bool(torch.isfinite(m).all()) or float(m.abs().max()) > MAX_ABS_SCALE:
        return torch.ones(k, dtype=M.dtype, device=M.device), True
    return m, False


def solve_with_retries(
    M: torch.Tensor, r: torch.Tensor, lam: float, retries: int
) -> tuple[torch.Tensor, bool, float]:
    """solve_scale; when some |m_i| > 10, retry up to ``retries`` times with λ × 10 (from
    1e-3 when λ = 0) before the m = 1 fallback. retries = 0: the plain rule."""
    m, fell_back = solve_scale(M, r, lam)
    for _ in range(retries):
        if not fell_back:
            break
        lam = lam * 10.0 if lam > 0 else 1e-3
        m, fell_back = solve_scale(M, r, lam)
    return m, fell_back, lam


@torch.no_grad()
def scale_and_prune(
    teacher: nn.Module,
    student: nn.Module,
    adapter: FFNAdapter,
    masks: list[torch.Tensor],
    sample: TokenizedSample,
    *,
    lam: float = 0.01,
    retries: int = 2,
    batch_size: int = 32,
    device: torch.device,
    progress: bool = True,
) -> ScaleResult:
    """Run Scale bottom-up; ``student`` (a copy of ``teacher``) is physically pruned in place,
    each layer's scales folded into its W2 columns."""
    calls, h_t = capture_block_inputs(teacher, adapter, sample, batch_size)
    h_s = [h.clone() for h in h_t]
    t_blocks, s_blocks = adapter.layers(teacher), adapter.layers(student)
    result = ScaleResult([], [], [], [], [], [], tokens=sample.n_tokens)
    bar = progress_bar(
        range(len(t_blocks)), total=len(t_blocks), desc="scale", enabled=progress, unit="layer"
    )
    for layer in bar:
        tb, sb = t_blocks[layer], s_blocks[layer]
        keep = masks[layer].to(device)
        k = int(keep.sum())
        W2 = adapter.w2(tb).weight.detach().float()  # (d, n), teacher == unpruned student
        W2k = W2[:, keep]
        G = torch.zeros(k, k, dtype=torch.float64, device=device)
        r = torch.zeros(k, dtype=torch.float64, device=device)
        yy = torch.zeros((), dtype=torch.float64, device=device)
        t_tap, s_tap = _Tap(adapter, tb, output=True), _Tap(adapter, sb)
        try:
            for b, call in enumerate(calls):
                t_tap.mask = s_tap.mask = call.mask
                h_t[b] = run_block(tb, call, h_t[b])
                target = t_tap.y + t_tap.x  # teacher W2·a_t + residual input, (t, d)
                run_block(sb, call, h_s[b])  # output unused: recomputed once m is known
                Y = target - s_tap.x
                A = s_tap.a[:, keep]
                G += (A.t() @ A).double()
                r += (A * (Y @ W2k)).sum(dim=0, dtype=torch.float64)
                yy += (Y * Y).sum(dtype=torch.float64)
                t_tap.x = t_tap.y = s_tap.x = s_tap.a = None
        finally:
            t_tap.remove()
            s_tap.remove()
        if k > 0:
            H = (W2k.t() @ W2k).double()
            M = H * G
            m, fell_back, lam_used = solve_with_retries(M, r, float(lam), retries)
            ones = torch.ones_like(m)
            err1 = float(ones @ M @ ones - 2 * ones @ r + yy)
            errm = float(m @ M @ m - 2 * m @ r + yy)
        else:
            m, fell_back = torch.ones(0, dtype=torch.float64, device=device), False
            lam_used = float(lam)
            err1 = errm = float(yy)
        result.scales.append(m.float().cpu())
        result.fallback.append(fell_back)
        result.lambda_used.append(lam_used)
        result.error_unscaled.append(err1)
        result.error_scaled.append(errm)
        result.target_energy.append(float(yy))
        adapter.shrink_ffn(sb, keep, m.float())
        for b, call in enumerate(calls):
            h_s[b] = run_block(sb, call, h_s[b])
    return result
