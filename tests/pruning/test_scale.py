"""Scale: the normal equations, the fallback, and held-out reconstruction."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.blockwise import model_inputs
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.scale import solve_scale, solve_with_retries


def test_normal_equations_match_explicit_least_squares():
    g = torch.Generator().manual_seed(0)
    T, d, k = 200, 6, 5
    A = torch.randn(T, k, generator=g, dtype=torch.float64)
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    Y = torch.randn(T, d, generator=g, dtype=torch.float64)
    M = (W.t() @ W) * (A.t() @ A)
    r = (A * (Y @ W)).sum(0)
    m, fb = solve_scale(M, r, 0.0)
    # explicit design: row (t, j) = W[j, :] * A[t, :]
    X = (A[:, None, :] * W[None, :, :]).reshape(T * d, k)
    ref = torch.linalg.lstsq(X, Y.reshape(-1, 1)).solution.squeeze(1)
    assert not fb
    assert torch.allclose(m, ref, atol=1e-8)
    # ridge towards 1: large lambda → m close to 1
    m_big, _ = solve_scale(M, r, 1e6)
    assert torch.allclose(m_big, torch.ones(k, dtype=torch.float64), atol=1e-3)


def test_fallback_when_scales_explode():
    M = torch.eye(3, dtype=torch.float64)
    r = torch.tensor([1.0, 50.0, 1.0], dtype=torch.float64)
    m, fb = solve_scale(M, r, 0.0)
    assert fb and torch.equal(m, torch.ones(3, dtype=torch.float64))
    m, fb, lam = solve_with_retries(M, r, 0.0, 0)  # the plain rule
    assert fb and lam == 0.0
    # retries: λ' = λ·mean(diag M) = λ; m_2 = (50 + λ) / (1 + λ) ≤ 10 needs λ ≥ 40/9
    m, fb, lam = solve_with_retries(M, r, 1.0, 2)
    assert not fb and lam == 10.0 and float(m.abs().max()) <= 10
    m, fb, lam = solve_with_retries(M, r, 0.1, 1)
    assert fb and torch.equal(m, torch.ones(3, dtype=torch.float64))


@torch.no_grad()
def _ffn_sums(model, sample):
    """Per layer, the pre-LayerNorm sum W2·a + x (bias-free) on the sample's real tokens."""
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    out = [[] for _ in blocks]
    cur = {}
    hooks = []
    for i, b in enumerate(blocks):
        w2 = adapter.w2(b)

        def h1(_m, args, i=i):
            cur[("x", i)] = real_tokens(args[0], cur["mask"])

        def h2(m, args, i=i):
            a = real_tokens(args[0], cur["mask"])
            out[i].append(a @ m.weight.t() + cur[("x", i)])

        hooks += [adapter.w1(b).register_forward_pre_hook(h1), w2.register_forward_pre_hook(h2)]
    try:
        for batch in sample.batches(32, "cpu"):
            cur["mask"] = batch["attention_mask"]
            model(**model_inputs(model, batch))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_scale_lowers_heldout_error_each_layer(arch, request, tokenizer, sentence_maker):
    make_sentences = sentence_maker
    model = request.getfixturevalue(arch)
    train = make_sentences(300, seed=2)
    held = prepare_sample(make_sentences(150, seed=99), tokenizer, samples=150)
    kw = dict(method="d2", tokenizer=tokenizer, progress=False, scale_samples=300)
    on = prune(model, train, 0.7, reconstruct="scale", **kw)
    off = prune(model, train, 0.7, scale=False, **kw)
    for i in on.masks:
        assert torch.equal(on.masks[i], off.masks[i])
    assert not any(row["scale_fallback"] for row in on.report["layers"])
    teacher = _ffn_sums(model, held)
    with_scale = _ffn_sums(on.model, held)
    without = _ffn_sums(off.model, held)
    for layer, (t, s, n) in enumerate(zip(teacher, with_scale, without, strict=True)):
        err_s = float(((s - t) ** 2).sum())
        err_n = float(((n - t) ** 2).sum())
        assert err_s < err_n, f"layer {layer}: scaled {err_s:.4g} >= unscaled {err_n:.4g}"
    # the in-sample errors in the report also drop
    for row in on.report["layers"]:
        assert row["scale_error_scaled"] <= row["scale_error_unscaled"]


def test_scale_first_layer_matches_direct_solve(bert, tokenizer, sentences):
    """Layer 0 has no drift from below: its m is the plain least-squares fit of the teacher's
    FFN output from the kept activations."""
    r = prune(
        bert,
        sentences,
        0.7,
        method="magnitude",
        reconstruct="scale",
        tokenizer=tokenizer,
        progress=False,
        experimental={"scale_lambda": 0.0},
        scale_samples=300,
        samples=300,
    )
    sample = prepare_sample(sentences, tokenizer, samples=300)
    adapter = get_adapter(bert)
    block = adapter.layers(bert)[0]
    acts = []
    cur = {}
    h = adapter.w2(block).register_forward_pre_hook(
        lambda _m, a: acts.append(real_tokens(a[0], cur["mask"]).double())
    )
    with torch.no_grad():
        for batch in sample.batches(32, "cpu"):
            cur["mask"] = batch["attention_mask"]
            bert(**model_inputs(bert, batch))
    h.remove()
    A = torch.cat(acts)
    W = block.output.dense.weight.detach().double()
    keep = r.masks[0]
    Y = A @ W.t()
    X = (A[:, keep][:, None, :] * W[:, keep][None, :, :]).reshape(-1, int(keep.sum()))
    ref = torch.linalg.lstsq(X, Y.reshape(-1, 1)).solution.squeeze(1)
    assert torch.allclose(r.scales[0].double(), ref, rtol=1e-3, atol=1e-3)
