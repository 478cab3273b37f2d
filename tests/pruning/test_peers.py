"""The label-free peers (flap, wanda_sp), their activation statistics and the layer
allocations."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning.activations import (
    ActivationStats,
    collect_activation_stats,
    real_tokens,
    token_means,
    token_norms,
    token_variances,
)
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.allocation import (
    ALLOCATIONS,
    allocate,
    convex_marginals,
    error_allocation,
    error_counts,
    masks_from_counts,
    proportional_counts,
    removal_error_curve,
    standardise,
)
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.methods.flap import flap_scores, fluctuation_scores
from kcm_cuda.pruning.methods.wanda_sp import wanda_sp_scores


def _all_activations(model, adapter, sample, batch_size):
    """Every real token's W2 input (and W1 input) per layer, by brute force."""
    acts = [[] for _ in adapter.layers(model)]
    ins = [[] for _ in adapter.layers(model)]
    cur = {}
    hooks = []
    for i, b in enumerate(adapter.layers(model)):
        hooks.append(
            adapter.w2(b).register_forward_pre_hook(
                lambda _m, a, i=i: acts[i].append(real_tokens(a[0], cur["m"]).double())
            )
        )
        hooks.append(
            adapter.w1(b).register_forward_pre_hook(
                lambda _m, a, i=i: ins[i].append(real_tokens(a[0], cur["m"]).double())
            )
        )
    from kcm_cuda.pruning.blockwise import model_inputs

    with torch.no_grad():
        for batch in sample.batches(batch_size, "cpu"):
            cur["m"] = batch["attention_mask"]
            model(**model_inputs(model, batch))
    for h in hooks:
        h.remove()
    return [torch.cat(a) for a in acts], [torch.cat(x) for x in ins]


def test_activation_statistics_match_brute_force(bert, tokenizer, sentences):
    adapter = get_adapter(bert)
    sample = prepare_sample(sentences, tokenizer, samples=40, max_length=24, seed=3)
    stats = collect_activation_stats(
        bert, adapter, sample, batch_size=8, device=torch.device("cpu"), progress=False, grams=True
    )
    acts, ins = _all_activations(bert, adapter, sample, 8)
    assert stats.n_batches == 5 and stats.n_tokens == acts[0].shape[0] == sample.n_tokens
    for layer, a in enumerate(acts):
        assert stats.sums[layer].shape == (5, a.shape[1])  # O(batches × n) memory
        torch.testing.assert_close(token_means(stats)[layer], a.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(token_variances(stats)[layer], a.var(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(token_norms(stats)[layer], a.norm(dim=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.grams[layer], a.t() @ a, rtol=1e-4, atol=1e-4)
        assert stats.input_sq[layer] == pytest.approx(float((ins[layer] ** 2).sum()), rel=1e-6)
    plain = collect_activation_stats(
        bert, adapter, sample, batch_size=8, device=torch.device("cpu"), progress=False
    )
    assert plain.grams is None and plain.input_sq is None and plain.sums is not None


def _stats_from_tokens(acts: list[torch.Tensor]) -> ActivationStats:
    """Statistics of one batch per layer from explicit (tokens × n) activations."""
    return ActivationStats(
        sq_sums=[(a * a).sum(0, keepdim=True) for a in acts],
        tokens=torch.tensor([acts[0].shape[0]]),
        sums=[a.sum(0, keepdim=True) for a in acts],
        grams=[a.t() @ a for a in acts],
    )


def test_flap_and_wanda_sp_scores_by_hand():
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.5], [5.0, 2.0, -0.5]], dtype=torch.float64)
    stats = _stats_from_tokens([a])
    w2 = [torch.tensor([1.0, 10.0, 2.0])]
    # variance over tokens: [4, 0, 0.25]; × ||W2||²: [4, 0, 1]
    fl = fluctuation_scores(stats, w2)[0]
    torch.testing.assert_close(fl, torch.tensor([4.0, 0.0, 1.0], dtype=torch.float64))
    st = flap_scores(stats, w2)[0]
    torch.testing.assert_close(st, (fl - fl.mean()) / fl.std())
    # a neuron that never moves (neuron 1) is FLAP's first to go, even with a big W2 column
    assert int(st.argmin()) == 1
    wa = wanda_sp_scores(stats, w2)[0]
    torch.testing.assert_close(wa, a.norm(dim=0) * w2[0].double())
    assert int(wa.argmax()) == 1


def test_peer_scores_bad_input():
    stats = _stats_from_tokens([torch.ones(4, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="2 W2 norm vectors for 1 layers"):
        wanda_sp_scores(stats, [torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="3 neurons, W2 of 4"):
        fluctuation_scores(stats, [torch.ones(4)])
    no_sums = ActivationStats(sq_sums=stats.sq_sums, tokens=stats.tokens)
    with pytest.raises(ValueError, match="no Σa"):
        flap_scores(no_sums, [torch.ones(3)])
    one_token = _stats_from_tokens([torch.ones(1, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        token_variances(one_token)


def test_standardise():
    s = standardise([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0]), torch.tensor([7.0])])
    torch.testing.assert_close(s[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert s[1].tolist() == [0.0, 0.0] and s[2].tolist() == [0.0]


def test_proportional_counts_exact_and_bounded():
    assert proportional_counts([10, 10, 10], 20, [0, 0, 0]) == [7, 7, 6]
    c = proportional_counts([100, 50, 7], 80, [1, 1, 5])
    assert sum(c) == 80 and c[2] >= 5
    assert proportional_counts([4, 4], 8, [0, 0]) == [4, 4]
    with pytest.raises(ValueError, match="cannot keep 9"):
        proportional_counts([4, 4], 9, [0, 0])


def test_removal_error_curve_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    S = a.t() @ a / 50
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    curve = removal_error_curve(S, w2, order)
    for m in range(7):
        P = order[:m]
        direct = ((a[:, P] @ w2[:, P].t()) ** 2).sum(1).mean() if m else torch.tensor(0.0)
        assert float(curve[m]) == pytest.approx(float(direct), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        removal_error_curve(S[:5, :5], w2, order)


def test_convex_marginals_envelope():
    curve = torch.tensor([0.0, 5.0, 6.0, 7.0, 20.0], dtype=torch.float64)
    mg = convex_marginals(curve)
    # the envelope passes (0,0) → (3,7) → (4,20)
    torch.testing.assert_close(mg, torch.tensor([7 / 3, 7 / 3, 7 / 3, 13.0], dtype=torch.float64))
    assert bool((mg[1:] >= mg[:-1]).all())
    assert float(mg.sum()) == pytest.approx(20.0)


def test_error_counts_greedy_and_min_keep():
    # layer 0: cheap to prune, layer 1: expensive
    mg = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    assert error_counts(mg, [4, 4], 4, [0, 0]) == [0, 4]
    assert error_counts(mg, [4, 4], 4, [1, 0]) == [1, 3]
    assert error_counts(mg, [4, 4], 8, [0, 0]) == [4, 4]
    with pytest.raises(ValueError, match="3 marginal errors for 4"):
        error_counts([mg[0][:3], mg[1]], [4, 4], 4, [0, 0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        error_counts([torch.tensor([float("nan")] * 4), mg[1]], [4, 4], 4, [0, 0])


def test_error_allocation_prefers_the_layer_that_matters_less():
    g = torch.Generator().manual_seed(1)
    quiet = torch.randn(200, 8, generator=g, dtype=torch.float64) * 0.01
    loud = torch.randn(200, 8, generator=g, dtype=torch.float64) * 3.0
    stats = _stats_from_tokens([quiet, loud])
    w2 = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    scores = [torch.rand(8, generator=g, dtype=torch.float64) for _ in range(2)]
    counts, curves = error_allocation(
        scores, stats.grams, token_means(stats), 200, w2, [1.0, 1.0], 8, [1, 1], centered=True
    )
    assert counts == [1, 7]
    assert [c.shape for c in curves] == [(9,), (9,)] and float(curves[0][0]) == 0.0
    masks = allocate(scores, 8, [1, 1], "error", counts=counts)
    assert [int(m.sum()) for m in masks] == [1, 7]
    # the kept neuron of layer 0 is its best-scored one
    assert bool(masks[0][int(scores[0].argmax())])


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_allocations_keep_exactly_k(allocation):
    g = torch.Generator().manual_seed(2)
    scores = [
        torch.rand(n, generator=g, dtype=torch.float64) * (i + 1)
        for i, n in enumerate([30, 20, 40])
    ]
    counts = [10, 10, 15] if allocation == "error" else None
    masks = allocate(scores, 35, [2, 2, 2], allocation, counts=counts)
    assert [m.shape for m in masks] == [(30,), (20,), (40,)]
    assert sum(int(m.sum()) for m in masks) == 35
    assert all(int(m.sum()) >= 2 for m in masks)
    if allocation == "uniform":
        assert [int(m.sum()) for m in masks] == proportional_counts([30, 20, 40], 35, [2] * 3)


def test_allocate_bad_input():
    s = [torch.rand(5), torch.rand(5)]
    with pytest.raises(ValueError, match="allocation must be one of"):
        allocate(s, 4, [0, 0], "fair")
    with pytest.raises(ValueError, match="needs the per-layer counts"):
        allocate(s, 4, [0, 0], "error")
    with pytest.raises(ValueError, match="do not fit"):
        allocate(s, 4, [0, 0], "error", counts=[3, 3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        masks_from_counts([torch.tensor([float("nan"), 1.0])], [1])


# -- through prune() ----------------------------------------------------------------------
from kcm_cuda.pruning import prune  # noqa: E402


@pytest.mark.parametrize("method", ["flap", "wanda_sp"])
@pytest.mark.parametrize("c", [0.8, 0.6])
def test_peer_methods_through_prune(method, c, bert, tokenizer, sentences):
    r = prune(
        bert,
        sentences,
        c,
        method=method,
        reconstruct="none",
        tokenizer=tokenizer,
        progress=False,
        samples=64,
    )
    assert r.report["method"] == method
    assert r.report["flops"]["ratio"] <= c
    kept = [int(m.sum()) for m in r.masks.values()]
    assert sum(kept) == r.report["flops"]["neurons_kept"]
    assert all(m.numel() == 96 for m in r.masks.values())
    # the masks are the global top-k of the method's own scores
    from kcm_cuda.pruning.activations import collect_activation_stats

    adapter = get_adapter(bert)
    sample = prepare_sample(sentences, tokenizer, samples=64, max_length=128, seed=0)
    stats = collect_activation_stats(
        bert, adapter, sample, batch_size=32, device=torch.device("cpu"), progress=False
    )
    w2n = [adapter.w2(b).weight.detach().norm(dim=0) for b in adapter.layers(bert)]
    fn = flap_scores if method == "flap" else wanda_sp_scores
    scores = fn(stats, w2n)
    flat = torch.cat(scores)
    kept_scores = torch.cat([s[r.masks[i]] for i, s in enumerate(scores)])
    dropped = torch.cat([s[~r.masks[i]] for i, s in enumerate(scores)])
    assert float(kept_scores.min()) >= float(dropped.max()) - 1e-9 * float(flat.abs().max())
    enc = tokenizer(sentences[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = r.model(**enc).logits
    assert out.shape == (4, 2) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", ["wanda_sp", "kcm", "magnitude"])
def test_allocation_option(allocation, method, distilbert, tokenizer, sentences):
    r = prune(
        distilbert,
        sentences,
        0.6,
        method=method,
        allocation=allocation,
        reconstruct="none",
        tokenizer=tokenizer,
        progress=False,
        samples=64,
    )
    assert r.report["options"]["allocation"] == allocation
    assert r.report["flops"]["ratio"] <= 0.6
    kept = r.report["kept_per_layer"]
    assert sum(kept) == r.report["flops"]["neurons_kept"]
    if allocation == "uniform":
        assert kept == proportional_counts([64, 64], sum(kept), [1, 1])
    if allocation == "error":
        sel = r.report["selection"]
        assert sel["allocation"] == "error" and sel["error_centered"] is False
        assert len(sel["predicted_relative_error"]) == 2
        assert all(e >= 0 for e in sel["predicted_relative_error"])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "uniform"),  # the default: flap + ridge
        ({"reconstruct": "ridge", "method": "wanda_sp"}, "uniform"),
        ({"reconstruct": "bias"}, "global"),  # FLAP as published keeps its global sort
        ({"reconstruct": "scale", "method": "d2"}, "global"),
        ({"scale": False}, "global"),
        ({"allocation": "global"}, "global"),  # asked for: honoured under ridge too
        ({"allocation": "error", "reconstruct": "bias"}, "error"),
    ],
)
def test_auto_allocation_is_uniform_under_the_ridge_refit(kwargs, expected):
    from kcm_cuda.pruning.options import PruneOptions

    assert PruneOptions(flops=0.5, **kwargs).allocation == expected


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"flops": 0.8}, False),
        ({"flops": 0.7}, True),  # the default at c <= 0.7: heads and neurons together
        ({"flops": 0.5}, True),
        ({"flops": 0.3}, True),
        ({"flops": 0.4, "reconstruct": "bias"}, False),  # FLAP as published: neurons only
        ({"flops": 0.4, "method": "kcm_paper"}, False),  # the paper's pipeline (Scale)
        ({"flops": 0.4, "heads": False}, False),
        ({"flops": 0.8, "heads": True}, True),
    ],
)
def test_auto_heads_at_and_below_seventy_percent_under_the_ridge_refit(kwargs, expected):
    from kcm_cuda.pruning.options import PruneOptions

    assert PruneOptions(**kwargs).heads is expected
    with pytest.raises(TypeError, match="heads must be True or False"):
        PruneOptions(flops=0.5, heads="yes")


def test_default_prune_reaches_below_the_attention_floor(bert, tokenizer, sentences):
    r = prune(bert, sentences, 0.3, tokenizer=tokenizer, progress=False, samples=64)
    assert r.head_masks is not None and r.report["flops"]["ratio"] <= 0.3 + 1e-9


def test_default_prune_keeps_uniform_widths(bert, tokenizer, sentences):
    r = prune(
        bert, sentences, 0.5, tokenizer=tokenizer, progress=False, samples=64, structure="fixed"
    )
    assert r.report["options"]["allocation"] == "uniform"
    kept = r.report["kept_per_layer"]
    sizes = [int(n) for n in get_adapter(bert).intermediate_sizes(bert)]
    assert kept == proportional_counts(sizes, sum(kept), [1] * len(sizes))


def test_error_allocation_moves_neurons_to_the_layer_that_needs_them(tokenizer, sentences):
    """Shrink layer 0's W2 a hundredfold: its neurons barely change the output, so the error
    allocation prunes layer 0 first (global wanda_sp too: its scores scale with ‖W2‖, but the
    standardised and uniform allocations do not see it)."""
    from tests.pruning.conftest import tiny_bert

    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(0.01)
    kw = dict(method="wanda_sp", reconstruct="none", tokenizer=tokenizer, progress=False)
    err = prune(model, sentences, 0.7, allocation="error", samples=64, **kw)
    uni = prune(model, sentences, 0.7, allocation="uniform", samples=64, **kw)
    assert err.report["kept_per_layer"][0] < min(err.report["kept_per_layer"][1:])
    assert err.report["kept_per_layer"][0] < uni.report["kept_per_layer"][0]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"allocation": "fair"}, ValueError, "allocation must be one of"),
        ({"allocation": 1}, ValueError, "allocation must be one of"),
        ({"experimental": {"sigma": "mean"}}, ValueError, "sigma must be one of"),
        ({"r2_cache": 3}, TypeError, "r2_cache must be True, False or a directory"),
        ({"r2_cache": ""}, ValueError, "r2_cache"),
    ],
)
def test_new_options_bad_input(kwargs, exc, match, bert, tokenizer, sentences):
    with pytest.raises(exc, match=match):
        prune(bert, sentences, 0.7, tokenizer=tokenizer, progress=False, **kwargs)


def test_r2_disk_cache_through_prune(bert, tokenizer, sentences, tmp_path):
    kw = dict(method="kcm", tokenizer=tokenizer, progress=False, samples=64, reconstruct="none")
    a = prune(bert, sentences, 0.7, **kw)
    assert a.report["r2_disk_cache"]["hit"] is False
    assert a.report["r2_disk_cache"]["dir"] == str(tmp_path / "r2_cache")
    b = prune(bert, sentences, 0.6, seed=4, **kw)  # another budget and sample: same R2
    assert b.report["r2_disk_cache"]["hit"] is True
    assert "r2" in b.report["timings_s"]
    off = prune(bert, sentences, 0.6, seed=4, r2_cache=False, **kw)
    assert off.report["r2_disk_cache"] == {"dir": None, "hit": False}
    for i in b.masks:
        assert torch.equal(b.masks[i], off.masks[i])
    own = prune(bert, sentences, 0.6, r2_cache=tmp_path / "mine", **kw)
    assert own.report["options"]["r2_cache"] == str(tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("*.pt"))) == 1
    # a corrupt entry: a warning, the same masks as a fresh solve
    entry = next((tmp_path / "mine").glob("*.pt"))
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        again = prune(bert, sentences, 0.6, r2_cache=tmp_path / "mine", **kw)
    for i in own.masks:
        assert torch.equal(own.masks[i], again.masks[i])


def test_sigma_median_through_prune(bert, tokenizer, sentences):
    kw = dict(tokenizer=tokenizer, progress=False, samples=64, reconstruct="none")
    r = prune(bert, sentences, 0.7, method="r2", experimental={"sigma": "median"}, **kw)
    assert r.report["options"]["experimental"]["sigma"] == "median"
    one = prune(bert, sentences, 0.7, method="r2", experimental={"sigma": 1.0}, **kw)
    assert r.report["flops"]["ratio"] <= 0.7 and one.report["flops"]["ratio"] <= 0.7
    d = prune(
        bert,
        sentences,
        0.7,
        method="d2",
        experimental=dict(d2_mode="kcm", d2_kcm_batches=1, sigma="median"),
        **kw,
    )
    assert d.report["flops"]["ratio"] <= 0.7


def test_flap_is_flap_as_published(bert, tokenizer, sentences):
    """FLAP (An et al. 2024), FFN part: scores from the dense model's statistics, one global
    sort of the per-layer standardised fluctuation, and b2 += W2[:, pruned]·mean(a_pruned)
    with the dense model's means over the calibration sample (reconstruct="bias",
    reconstruct_mode="oneshot", the whole sample)."""
    from kcm_cuda.pruning.activations import collect_activation_stats

    n = 64
    r = prune(
        bert,
        sentences,
        0.6,
        method="flap",
        reconstruct="bias",
        experimental={"reconstruct_mode": "oneshot"},
        scale_samples=n,
        tokenizer=tokenizer,
        progress=False,
        samples=n,
    )
    assert r.report["reconstruct"] == "bias"  # FLAP as published: bias compensation
    adapter = get_adapter(bert)
    sample = prepare_sample(sentences, tokenizer, samples=n, max_length=128, seed=0)
    stats = collect_activation_stats(
        bert, adapter, sample, batch_size=32, device=torch.device("cpu"), progress=False
    )
    means = token_means(stats)
    for i, (tb, pb) in enumerate(zip(adapter.layers(bert), adapter.layers(r.model), strict=True)):
        keep = r.masks[i]
        W2, b2 = adapter.w2(tb).weight.detach().double(), adapter.w2(tb).bias.detach().double()
        expected_b = b2 + W2[:, ~keep] @ means[i][~keep]
        got = adapter.w2(pb)
        torch.testing.assert_close(got.weight.detach().double(), W2[:, keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(got.bias.detach().double(), expected_b, rtol=1e-5, atol=1e-5)
        w1 = adapter.w1(pb)
        torch.testing.assert_close(w1.weight, adapter.w1(tb).weight[keep])
    # scores → masks: the global top-k of FLAP's standardised scores
    w2n = [adapter.w2(b).weight.detach().norm(dim=0) for b in adapter.layers(bert)]
    scores = flap_scores(stats, w2n)
    kept = torch.cat([s[r.masks[i]] for i, s in enumerate(scores)])
    dropped = torch.cat([s[~r.masks[i]] for i, s in enumerate(scores)])
    assert float(kept.min()) >= float(dropped.max()) - 1e-9


def test_wanda_sp_with_and_without_bias_compensation(bert, tokenizer, sentences):
    kw = dict(method="wanda_sp", tokenizer=tokenizer, progress=False, samples=64)
    plain = prune(bert, sentences, 0.6, reconstruct="none", **kw)
    comp = prune(bert, sentences, 0.6, reconstruct="bias", **kw)
    assert plain.report["reconstruct"] == "none" and comp.report["reconstruct"] == "bias"
    adapter = get_adapter(bert)
    for i in plain.masks:
        assert torch.equal(plain.masks[i], comp.masks[i])  # same selection
    b_plain = [adapter.w2(b).bias for b in adapter.layers(plain.model)]
    b_comp = [adapter.w2(b).bias for b in adapter.layers(comp.model)]
    torch.testing.assert_close(b_plain[0], adapter.w2(adapter.layers(bert)[0]).bias)
    assert any(not torch.allclose(a, b) for a, b in zip(b_plain, b_comp, strict=True))
    # compensation lowers each layer's output error on the reconstruction sample
    for row in comp.report["layers"]:
        assert row["reconstruct_error_after"] <= row["reconstruct_error_before"] + 1e-9
