"""obs: the structured OBS selection (removal order, its refit-error curve, the layer widths
it picks) and its path through prune()."""

from __future__ import annotations

import itertools

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.methods.obs import damped_covariance, masks_from_order, removal_order


def _refit_error(cov: torch.Tensor, w2: torch.Tensor, kept: list[int]) -> float:
    """min_B E‖W a − B a_K‖² (a centred, covariance ``cov``) by the explicit least squares:
    tr(W (Σ − Σ_:K Σ_KK⁻¹ Σ_K:) Wᵀ)."""
    if kept:
        k = torch.tensor(kept)
        s = cov - cov[:, k] @ torch.linalg.solve(cov[k][:, k], cov[k])
    else:
        s = cov
    return float((w2 @ s @ w2.t()).trace())


def _layer(n=8, d=5, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.5
    w2 = torch.randn(d, n, generator=g, dtype=torch.float64)
    gram = a.t() @ a
    return a, gram, a.mean(0), w2


@pytest.mark.parametrize("steps", [8, 3, 1])
def test_error_curve_is_the_least_squares_refit_error(steps):
    """At each block boundary the curve is exactly the error that the best refit of the kept
    columns (with a bias: centred covariance) leaves."""
    a, gram, mu, w2 = _layer()
    cov = damped_covariance(gram, mu, a.shape[0], damping=0.0)
    order, curve = removal_order(cov, w2, steps=steps, keep_last=0)
    assert sorted(order.tolist()) == list(range(8)) and curve.shape == (9,)
    per = -(-8 // steps)
    for m in list(range(0, 8, per)) + [8]:
        want = _refit_error(cov, w2, order[m:].tolist())
        assert float(curve[m]) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_greedy_order_removes_the_cheapest_neuron_first():
    a, gram, mu, w2 = _layer(n=6, seed=3)
    cov = damped_covariance(gram, mu, a.shape[0], damping=0.0)
    order, curve = removal_order(cov, w2, steps=6, keep_last=0)
    costs = [_refit_error(cov, w2, [j for j in range(6) if j != i]) for i in range(6)]
    assert int(order[0]) == min(range(6), key=costs.__getitem__)
    # greedy is never better than the best pair (the optimum), and is close on this layer
    best_pair = min(
        _refit_error(cov, w2, [j for j in range(6) if j not in p])
        for p in itertools.combinations(range(6), 2)
    )
    assert float(curve[2]) >= best_pair - 1e-9


def test_a_redundant_loud_neuron_is_removed_first():
    """Neuron 0 is a copy of neuron 1 and has ten times its output weight: the loudest
    neuron by energy (FLAP / Wanda-sp keep it). The refit moves either one's weight onto the
    other for free, so OBS removes one of the pair first, at no cost, and keeps the other."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64)
    a[:, 0] = a[:, 1]
    w2 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w2[:, 0] *= 10
    cov = damped_covariance(a.t() @ a, a.mean(0), 400, damping=1e-6)
    order, curve = removal_order(cov, w2, steps=5, keep_last=1)
    assert int(order[0]) in (0, 1)
    assert float(curve[1]) < 1e-3 * float(curve[2])
    assert ({0, 1} - {int(order[0])}).pop() not in order[1:2].tolist()
    assert int(order.numel()) == 5 and float(curve[-1]) == float(curve[-2])  # keep_last


def test_damped_covariance_checks_and_floors():
    with pytest.raises(ValueError, match="at least one token"):
        damped_covariance(torch.zeros(3, 3), torch.zeros(3), 0)
    with pytest.raises(ValueError, match="Gram of shape"):
        damped_covariance(torch.zeros(3, 3), torch.zeros(4), 10)
    dead = damped_covariance(torch.zeros(3, 3), torch.zeros(3), 10)
    assert torch.equal(dead, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes do not match"):
        removal_order(dead, torch.zeros(2, 4))


def test_masks_from_order():
    masks = masks_from_order([torch.tensor([2, 0, 1, 3]), torch.tensor([1, 0])], [1, 2])
    assert masks[0].tolist() == [False, False, False, True]
    assert masks[1].tolist() == [True, True]


def test_obs_prunes_through_the_api(tokenizer, sentences):
    from tests.pruning.conftest import tiny_bert

    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    kw = dict(method="obs", tokenizer=tokenizer, samples=64, progress=False)
    res = prune(model, sentences, 0.6, allocation="error", **kw)  # its own refit-error widths
    rep = res.report
    assert rep["flops"]["ratio"] <= 0.6 + 1e-9
    sel = rep["selection"]
    assert sel["allocation"] == "obs_error"
    assert sel["kept_per_layer"] == rep["kept_per_layer"]
    errs = sel["predicted_relative_error"]
    assert len(errs) == len(rep["kept_per_layer"]) and all(e >= 0 for e in errs)
    uni = prune(model, sentences, 0.6, **kw).report  # "auto" under its ridge refit: uniform
    assert uni["selection"]["allocation"] == "uniform"
    assert max(uni["kept_per_layer"]) - min(uni["kept_per_layer"]) <= 1
    assert sum(uni["kept_per_layer"]) == sum(rep["kept_per_layer"])


def test_obs_refuses_allocations_it_cannot_honour(tokenizer, sentences):
    from tests.pruning.conftest import tiny_bert

    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="method='obs' decides its own layer widths"):
        prune(model, sentences, 0.6, method="obs", allocation="standardised", tokenizer=tokenizer)
