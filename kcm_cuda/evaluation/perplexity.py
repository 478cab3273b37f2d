"""Sliding-window perplexity of a causal LM on one token stream.

Windows of ``window`` tokens move forward ``stride`` tokens at a time (stride < window):
the first window scores every token it holds but its first, each later one only the
``stride`` tokens at its end that no earlier window scored, with at least ``window - stride``
tokens of context. So every token of the stream but the first is predicted exactly once, and
(when the stream is at least one window long) all windows are full-length and batch without
padding. Perplexity = exp(total NLL / tokens scored).

Works for any ``*ForCausalLM`` (a pruned one included): the model is run in eval mode under
``torch.no_grad`` and its ``.logits`` are used; the loss is computed here in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["paired_difference", "sliding_windows", "sliding_window_nll"]


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a stream of ``n_tokens``: the window
    is ``ids[begin:end]`` and the targets ``first_scored .. end-1`` are scored by it."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride < window:
        raise ValueError(
            f"stride must lie in [1, window={window}) (a window's first token has no "
            f"context in it), got {stride}"
        )
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    out = []
    scored_to = 1  # token 0 has no context: never scored
    end = min(window, n_tokens)  # the first window scores all it holds
    while True:
        out.append((max(0, end - window), end, scored_to))
        scored_to = end
        if end >= n_tokens:
            break
        end = min(end + stride, n_tokens)  # then `stride` new tokens per window
    return out


@torch.no_grad()
def sliding_window_nll(
    model,
    ids: torch.Tensor,
    *,
    window: int = 128,
    stride: int = 64,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> dict:
    """Sliding-window NLL of ``model`` on the 1-D token stream ``ids``.

    Returns {"ppl", "nll" (mean per token, nats), "tokens", "windows", "window", "stride",
    "window_nll" (np.ndarray: summed NLL of the tokens each window scored), "window_tokens"
    (np.ndarray: how many it scored)}."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    spans = sliding_windows(ids.numel(), window, stride)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    was = model.training
    model.eval()
    w_nll = np.zeros(len(spans), dtype=np.float64)
    w_tok = np.zeros(len(spans), dtype=np.int64)
    try:
        # group windows of equal length (all of them when the stream fills one window)
        by_len: dict[int, list[int]] = {}
        for k, (b, e, _) in enumerate(spans):
            by_len.setdefault(e - b, []).append(k)
        for _length, ks in by_len.items():
            for i in range(0, len(ks), batch_size):
                chunk = ks[i : i + batch_size]
                x = torch.stack([ids[spans[k][0] : spans[k][1]] for k in chunk]).to(device)
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, length-1]
                for row, k in enumerate(chunk):
                    b, e, first = spans[k]
                    # target position t (stream index) is column t - b - 1
                    w_nll[k] = float(nll[row, first - b - 1 :].sum())
                    w_tok[k] = e - first
    finally:
        model.train(was)
    total = float(w_nll.sum())
    n = int(w_tok.sum())
    if n != ids.numel() - 1:  # pragma: no cover - sliding_windows guarantees it
        raise AssertionError(f"scored {n} tokens, expected {ids.numel() - 1}")
    return {
        "ppl": math.exp(total / n),
        "nll": total / n,
        "tokens": n,
        "windows": len(spans),
        "window": window,
        "stride": stride,
        "window_nll": w_nll,
        "window_tokens": w_tok,
    }


def paired_difference(a: dict, b: dict) -> dict:
    """Mean per-token NLL of ``a`` minus that of ``b`` (two results of sliding_window_nll on
    the same stream and windows), with a standard error that treats the windows as the
    sampling units (ratio estimator: d_w = NLL_a,w - NLL_b,w per window; Δ = Σd / Σn;
    SE = sqrt(Σ(d_w - Δ n_w)² · W/(W-1)) / Σn). ``ppl_ratio`` = exp(Δ) = ppl_a / ppl_b.
    Windows are adjacent text, so the SE ignores their (small) correlation."""
    na, nb = np.asarray(a["window_tokens"]), np.asarray(b["window_tokens"])
    if na.shape != nb.shape or not np.array_equal(na, nb):
        raise ValueError("the two results do not score the same windows")
    d = np.asarray(a["window_nll"]) - np.asarray(b["window_nll"])
    n = na.astype(np.float64)
    total = n.sum()
    delta = d.sum() / total
    w = d.size
    se = (
        math.sqrt(((d - delta * n) ** 2).sum() * w / max(1, w - 1)) / total
        if w > 1
        else float("nan")
    )
    return {
        "delta_nll": float(delta),
        "se": float(se),
        "z": float(delta / se) if se and math.isfinite(se) and se > 0 else float("nan"),
        "ppl_ratio": math.exp(delta),
        "windows": int(w),
        "a_worse_windows": int((d > 0).sum()),
    }
