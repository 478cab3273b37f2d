"""Reconstruction: the general ridge refit, exactness, the Scale special case, bias
compensation, physical pruning and reload, bad options."""

from __future__ import annotations

import copy

import pytest
import torch

from kcm_cuda.pruning import load_pruned, prune
from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.blockwise import model_inputs
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.methods import METHODS, Method, Selection
from kcm_cuda.pruning.reconstruct import LinearRefit, refit_layers, refit_linear
from kcm_cuda.pruning.scale import scale_and_prune


def test_ridge_refit_recovers_a_representable_target():
    g = torch.Generator().manual_seed(0)
    t, n, d = 400, 12, 5
    X = torch.randn(t, n, generator=g)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[::2] = True
    W_true, b_true = torch.randn(d, 6, generator=g), torch.randn(d, generator=g)
    lin = torch.nn.Linear(n, d)
    target = X[:, keep] @ W_true.t() + b_true
    W, b, fb = refit_linear(lin, keep, X, target, lam=0.0)
    assert not fb
    assert torch.allclose(W, W_true, atol=1e-4) and torch.allclose(b, b_true, atol=1e-4)
    # a huge λ pins W to the original kept columns; the bias (not penalised) still moves
    W, b, _ = refit_linear(lin, keep, X, target, lam=1e9)
    assert torch.allclose(W, lin.weight[:, keep].detach(), atol=1e-4)
    best_b = (target - X[:, keep] @ lin.weight[:, keep].detach().t()).mean(0)
    assert torch.allclose(b, best_b, atol=1e-3)
    # a Linear without bias: no bias row
    lin0 = torch.nn.Linear(n, d, bias=False)
    W, b, fb = refit_linear(lin0, keep, X, X[:, keep] @ W_true.t(), lam=0.0)
    assert b is None and not fb and torch.allclose(W, W_true, atol=1e-4)


def test_ridge_error_never_above_scale_or_plain():
    """Scale (W₂ₖ·diag m) lies in ridge's search space: in sample, ridge ≤ scale ≤ plain."""
    from kcm_cuda.pruning.scale import solve_scale

    g = torch.Generator().manual_seed(1)
    t, k, d = 300, 8, 6
    A = torch.randn(t, k, generator=g).abs()
    W0 = torch.randn(d, k, generator=g)
    Y = A @ (W0 * 1.3).t() + 0.1 * torch.randn(t, d, generator=g)
    fit = LinearRefit(k, d, torch.device("cpu"))
    fit.add(A, Y)
    M = (W0.t() @ W0).double() * fit.G[:k, :k]
    r = (fit.C[:k] * W0.t().double()).sum(1)
    m, _ = solve_scale(M, r, 0.0)
    W, db, fb = fit.ridge(W0, 0.0)
    e_plain, e_scale, e_ridge = fit.error(W0), fit.error(W0.double() * m), fit.error(W, db)
    assert not fb and e_ridge <= e_scale + 1e-6 and e_scale <= e_plain
    # the statistics' error is the explicit one (up to float32 products over Σ||Y||²)
    explicit = float(((A.double() @ W.t() + db - Y.double()) ** 2).sum())
    assert abs(e_ridge - explicit) <= 1e-5 * float(fit.yy)


def test_failed_solve_falls_back_to_plain():
    fit = LinearRefit(3, 2, torch.device("cpu"))
    fit.add(torch.full((5, 3), float("nan")), torch.zeros(5, 2))
    W0 = torch.ones(2, 3)
    W, db, fb = fit.ridge(W0, 0.01)
    assert fb and torch.equal(W, W0.double()) and not db.any()


class _FirstHalf(Method):
    name = "first_half"

    def select(self, ctx):
        masks = []
        for n in ctx.sizes:
            m = torch.zeros(n, dtype=torch.bool)
            m[: n // 2] = True
            masks.append(m)
        return Selection(masks=masks)


@pytest.fixture
def first_half(monkeypatch):
    monkeypatch.setitem(METHODS, "first_half", _FirstHalf())
    return "first_half"


def _twin_neurons(model):
    """Neuron j + n/2 a copy of neuron j (same W1 row and b1) in every layer: dropping the
    second half loses nothing a refit of W2 cannot restore (W2ₖ' = W2[:, :h] + W2[:, h:])."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for block in adapter.layers(model):
            w1 = adapter.w1(block)
            h = w1.out_features // 2
            w1.weight[h:] = w1.weight[:h]
            w1.bias[h:] = w1.bias[:h]
    return model


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_ridge_is_exact_when_kept_neurons_can_represent_the_layer(
    mode, first_half, tokenizer, sentences, builders
):
    model = _twin_neurons(builders["bert"]("seqcls", vocab_size=tokenizer.vocab_size))
    kw = dict(tokenizer=tokenizer, progress=False, samples=200, scale_samples=200, min_keep=0)
    r = prune(
        model,
        sentences,
        0.99,
        method=first_half,
        reconstruct="ridge",
        experimental={"reconstruct_mode": mode},
        ridge_lambda=0.0,
        structure="fixed",  # this refit mode, not the search's choice
        **kw,
    )
    assert r.report["reconstruct"] == "ridge" and r.report["reconstruct_mode"] == mode
    for row in r.report["layers"]:
        assert not row["reconstruct_fallback"]
        assert row["reconstruct_error_after"] <= 1e-6 * row["reconstruct_target_energy"]
        assert row["reconstruct_error_before"] > 1e-2 * row["reconstruct_target_energy"]
    enc = tokenizer(sentences[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = model(**enc).logits, r.model(**enc).logits
    assert (a - b).abs().max() <= 1e-3
    plain = prune(model, sentences, 0.99, method=first_half, scale=False, **kw)
    with torch.no_grad():
        assert (a - plain.model(**enc).logits).abs().max() > 1e-2


def test_scale_is_todays_scale(tokenizer, sentences, builders):
    """reconstruct="scale" gives the factors of the Scale procedure (kcm_cuda.pruning.scale)."""
    model = builders["bert"]("seqcls", vocab_size=tokenizer.vocab_size)
    r = prune(
        model,
        sentences,
        0.6,
        method="d2",
        reconstruct="scale",
        tokenizer=tokenizer,
        progress=False,
        samples=128,
        scale_samples=128,
    )
    assert r.report["reconstruct"] == "scale"
    adapter = get_adapter(model)
    sample = prepare_sample(sentences, tokenizer, samples=128)
    student = copy.deepcopy(model)
    masks = [r.masks[i] for i in sorted(r.masks)]
    ref = scale_and_prune(
        model,
        student,
        adapter,
        masks,
        sample,
        lam=0.01,
        retries=2,
        batch_size=32,
        device=torch.device("cpu"),
        progress=False,
    )
    for i, m in enumerate(ref.scales):
        assert torch.allclose(r.scales[i], m, rtol=1e-4, atol=1e-4)
        row = r.report["layers"][i]
        assert row["scale_error_scaled"] == pytest.approx(ref.error_scaled[i], rel=1e-3)
    # at layer 0 (same inputs for every variant) ridge's in-sample error is below Scale's
    ridge = prune(
        model,
        sentences,
        0.6,
        method="d2",
        tokenizer=tokenizer,
        progress=False,
        samples=128,
        scale_samples=128,
        reconstruct="ridge",
        ridge_lambda=0.0,
    )
    l0_r, l0_s = ridge.report["layers"][0], r.report["layers"][0]
    assert l0_r["reconstruct_error_after"] <= l0_s["reconstruct_error_after"] * (1 + 1e-6)


@torch.no_grad()
def _w2_outputs(model, layer, sample):
    adapter = get_adapter(model)
    out, cur = [], {}
    h = adapter.w2(adapter.layers(model)[layer]).register_forward_hook(
        lambda _m, _a, o: out.append(real_tokens(o, cur["mask"]).double())
    )
    try:
        for batch in sample.batches(32, "cpu"):
            cur["mask"] = batch["attention_mask"]
            model(**model_inputs(model, batch))
    finally:
        h.remove()
    return torch.cat(out)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_bias_compensation_keeps_the_mean_output(family, tokenizer, sentences, builders):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    kw = dict(
        method="magnitude", tokenizer=tokenizer, progress=False, samples=150, scale_samples=150
    )
    r = prune(
        model,
        sentences,
        0.6,
        reconstruct="bias",
        experimental={"reconstruct_mode": "oneshot"},
        **kw,
    )
    plain = prune(model, sentences, 0.6, scale=False, **kw)
    sample = prepare_sample(sentences, tokenizer, samples=150)
    teacher = _w2_outputs(model, 0, sample).mean(0)
    comp = _w2_outputs(r.model, 0, sample).mean(0)
    raw = _w2_outputs(plain.model, 0, sample).mean(0)
    assert torch.allclose(comp, teacher, atol=1e-4)
    assert (raw - teacher).abs().max() > 1e-2
    adapter = get_adapter(model)
    assert torch.equal(
        adapter.w2(adapter.layers(r.model)[0]).weight,
        adapter.w2(adapter.layers(plain.model)[0]).weight,
    )
    for row in r.report["layers"]:  # the mean shift lowers the in-sample error (one-shot)
        assert row["reconstruct_error_after"] <= row["reconstruct_error_before"]


@pytest.mark.parametrize(
    "family,kind,variant",
    [("bert", "seqcls", "ridge"), ("distilbert", "qa", "bias"), ("roberta", "seqcls", "ridge")],
)
def test_physical_pruning_and_reload(
    tmp_path, tokenizer, sentences, builders, family, kind, variant
):
    model = builders[family](kind, vocab_size=tokenizer.vocab_size)
    r = prune(
        model,
        sentences,
        0.65,
        heads=False,  # the masked equivalent below is FFN-only
        reconstruct=variant,
        tokenizer=tokenizer,
        progress=False,
        samples=128,
    )
    adapter = get_adapter(model)
    assert adapter.intermediate_sizes(r.model) == r.report["kept_per_layer"]
    # the masked equivalent: refitted columns in place, pruned ones zero, refitted b2
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, (mb, pb) in enumerate(
            zip(adapter.layers(masked), adapter.layers(r.model), strict=True)
        ):
            w2 = adapter.w2(mb)
            w2.weight.zero_()
            w2.weight[:, r.masks[i]] = adapter.w2(pb).weight
            w2.bias.copy_(adapter.w2(pb).bias)
    enc = tokenizer(
        sentences[:16], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    loaded = load_pruned(r.save(tmp_path / "p"))
    with torch.no_grad():
        ref, got, rel = masked(**inputs), r.model(**inputs), loaded(**inputs)
    for key in ref:
        if isinstance(ref[key], torch.Tensor):
            assert (ref[key] - got[key]).abs().max() <= 1e-4
            assert (ref[key] - rel[key]).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"reconstruct": "exact"}, ValueError, "reconstruct must be one of"),
        ({"reconstruct": True}, ValueError, "reconstruct"),
        ({"experimental": {"reconstruct_mode": "both"}}, ValueError, "reconstruct_mode"),
        ({"ridge_lambda": -1.0}, ValueError, "ridge_lambda"),
        ({"ridge_lambda": float("nan")}, ValueError, "ridge_lambda"),
        ({"ridge_lambda": "big"}, TypeError, "ridge_lambda"),
    ],
)
def test_bad_reconstruction_options(kwargs, exc, match, bert, tokenizer, sentences):
    with pytest.raises(exc, match=match):
        prune(bert, sentences, 0.7, tokenizer=tokenizer, progress=False, **kwargs)


def test_refit_layers_bad_variant(bert, tokenizer, sentences):
    sample = prepare_sample(sentences, tokenizer, samples=8)
    with pytest.raises(ValueError, match="variant"):
        refit_layers(
            bert,
            copy.deepcopy(bert),
            get_adapter(bert),
            [],
            sample,
            variant="exact",
            device=torch.device("cpu"),
        )
    with pytest.raises(ValueError, match="mode"):
        refit_layers(
            bert,
            copy.deepcopy(bert),
            get_adapter(bert),
            [],
            sample,
            variant="ridge",
            mode="twice",
            device=torch.device("cpu"),
        )
