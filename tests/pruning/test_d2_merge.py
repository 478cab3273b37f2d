"""D2 voting and the R2D2 merge variants."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning.activations import ActivationStats
from kcm_cuda.pruning.d2 import d2_scores, vote_fractions
from kcm_cuda.pruning.masks import global_topk
from kcm_cuda.pruning.merge import MERGES, merge_scores, normalized_rank


def _stats(energy_rows: list[list[float]]) -> ActivationStats:
    sq = torch.tensor(energy_rows, dtype=torch.float64) ** 2
    return ActivationStats(sq_sums=[sq], tokens=torch.ones(sq.shape[0], dtype=torch.long))


def test_votes_majority_and_energy_tiebreak():
    # 4 batches, 5 neurons, quota 2: neuron 0 always top; 1 and 2 split the second place
    rows = [
        [9.0, 5.0, 1.0, 0.1, 0.0],
        [9.0, 1.0, 5.0, 0.1, 0.0],
        [9.0, 5.0, 1.0, 0.1, 0.0],
        [9.0, 1.0, 6.0, 0.1, 0.0],
    ]
    w = [torch.ones(5)]
    votes = vote_fractions([torch.tensor(rows, dtype=torch.float64)], [2])[0]
    assert votes.tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]
    res = d2_scores(_stats(rows), w, [2], mode="votes")
    s = res.scores[0]
    # equal votes for 1 and 2: broken by mean energy (neuron 2: 3.25 > neuron 1: 3.0)
    assert s[2] > s[1] > s[3] > s[4]
    assert s[0] > s[2]
    # tie-break never crosses a vote step
    assert (s - votes).max() < 0.5 * res.vote_step + 1e-12
    energy = d2_scores(_stats(rows), w, [2], mode="energy")
    assert torch.allclose(energy.scores[0], torch.tensor(rows).double().mean(0))


def test_w2_norm_enters_energy():
    rows = [[1.0, 1.0, 1.0]]
    res = d2_scores(_stats(rows), [torch.tensor([1.0, 3.0, 2.0])], [1], mode="energy")
    assert torch.argsort(res.scores[0], descending=True).tolist() == [1, 2, 0]


def test_normalized_rank():
    r = normalized_rank(torch.tensor([3.0, 1.0, 2.0, 2.0]))
    assert r.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert normalized_rank(torch.tensor([7.0])).tolist() == [1.0]


@pytest.mark.parametrize("merge", MERGES)
def test_merge_variants_shapes_and_monotone(merge):
    g = torch.Generator().manual_seed(0)
    r2 = [torch.rand(30, generator=g, dtype=torch.float64) for _ in range(3)]
    d2 = [torch.rand(30, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    out = merge_scores(r2, d2, d2, merge=merge)
    assert [o.shape for o in out] == [(30,)] * 3
    assert all(torch.isfinite(o).all() for o in out)
    # a neuron best in both R2 and D2 of its layer is never below one worst in both
    for o, a, b in zip(out, r2, d2, strict=True):
        best = int(torch.argmax(normalized_rank(a) + normalized_rank(b)))
        worst = int(torch.argmin(normalized_rank(a) + normalized_rank(b)))
        if a[best] > a[worst] and b[best] > b[worst]:
            assert o[best] >= o[worst]


def test_mean_rank_is_near_uniform_and_energy_weighted_is_not():
    g = torch.Generator().manual_seed(1)
    r2 = [torch.rand(100, generator=g, dtype=torch.float64) for _ in range(2)]
    d2 = [torch.rand(100, generator=g, dtype=torch.float64) for _ in range(2)]
    energy = [d2[0] * 1.0, d2[1] * 4.0]
    uni = global_topk(merge_scores(r2, d2, energy, merge="mean_rank"), 100)
    assert abs(int(uni[0].sum()) - int(uni[1].sum())) <= 10
    ew = global_topk(merge_scores(r2, d2, energy, merge="energy_weighted"), 100)
    assert int(ew[1].sum()) > int(ew[0].sum()) + 20


def test_d2_r2_tiebreak_orders_votes_first():
    votes = [torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64)]
    r2 = [torch.tensor([0.0, 0.1, 0.9, 1.0], dtype=torch.float64)]
    out = merge_scores(r2, votes, votes, merge="d2_r2_tiebreak", d2_votes=votes, vote_step=0.5)[0]
    assert torch.argsort(out, descending=True).tolist() == [0, 2, 1, 3]


def test_bad_merge():
    with pytest.raises(ValueError, match="merge"):
        merge_scores([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], merge="nope")
