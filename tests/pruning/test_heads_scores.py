"""Head scores (D2 head energies, R2 on O slices), the joint head / neuron budget split and
the head selection, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.flops import FlopsModel
from kcm_cuda.pruning.heads import (
    JOINT_SPLITS,
    HeadEnergyRecorder,
    collect_head_stats,
    head_quotas,
    head_r2_scores,
    head_scores,
    mean_square,
    select_heads,
    split_budget,
)
from kcm_cuda.pruning.physical import apply_head_masks_in_place


def _batch(tokenizer, sentences, n=8):
    enc = tokenizer(
        sentences[:n], padding=True, max_length=32, truncation=True, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _o_outputs(model, adapter, inputs):
    outs = []
    hooks = [
        adapter.o(b).register_forward_hook(lambda _m, _a, o: outs.append(o))
        for b in adapter.layers(model)
    ]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_head_energy_is_the_heads_contribution(family, builders, tokenizer, sentences):
    model = builders[family]("base", vocab_size=tokenizer.vocab_size)
    adapter = get_adapter(model)
    inputs = _batch(tokenizer, sentences)
    rec = HeadEnergyRecorder(model, adapter)
    with torch.no_grad():
        model(**inputs)
    stats = rec.detach()
    assert stats.n_batches == 1
    assert not rec.handles
    full = _o_outputs(model, adapter, inputs)
    real = inputs["attention_mask"].bool()
    # Masking head h of layer 0 changes layer 0's O output by exactly the head's contribution.
    for h in range(4):
        masks = [torch.ones(4, dtype=torch.bool) for _ in adapter.layers(model)]
        masks[0][h] = False
        masked = apply_head_masks_in_place(copy.deepcopy(model), adapter, masks)
        diff = (full[0] - _o_outputs(masked, adapter, inputs)[0])[real]
        assert float(stats.energy[0][0, h]) == pytest.approx(float(diff.norm()), rel=1e-4)


def test_collect_head_stats_votes_and_r2(bert, tokenizer, sentences):
    adapter = get_adapter(bert)
    sample = prepare_sample(sentences, tokenizer, samples=64, max_length=32, seed=0)
    stats = collect_head_stats(bert, adapter, sample, batch_size=16, device=torch.device("cpu"))
    assert stats.n_batches == 4
    assert [tuple(e.shape) for e in stats.energy] == [(4, 4)] * 3
    assert all(bool((e > 0).all()) for e in stats.energy)
    r2, iters = head_r2_scores(bert, adapter)
    assert len(r2) == 3 and all(x.shape == (4,) for x in r2) and len(iters) == 3
    assert all(bool(((x > 0) & (x <= 1 + 1e-6)).all()) for x in r2)
    # with the median distance as sigma the kernel is informative (C is not the identity)
    assert any(float(x.min()) < 0.99 for x in r2)
    quotas = head_quotas(6, [4, 4, 4])
    assert quotas == [2, 2, 2]
    votes = head_scores(stats, quotas, mode="votes", r2=r2)
    for v in votes:
        assert bool(((v >= 0) & (v < 1.5)).all())
    assert sum(int((v >= 1.0).sum()) for v in votes) >= 1
    for x, y in zip(head_scores(stats, quotas, mode="energy"), stats.mean(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(head_scores(stats, quotas, mode="r2", r2=r2)[0], r2[0].double())
    with pytest.raises(ValueError, match="needs R2"):
        head_scores(stats, quotas, mode="r2")
    with pytest.raises(ValueError, match="head score mode"):
        head_scores(stats, quotas, mode="nope")
    with pytest.raises(ValueError, match="head sigma"):
        head_r2_scores(bert, adapter, sigma=0.0)
    masks = select_heads(votes, 5, min_heads=1)
    assert sum(int(m.sum()) for m in masks) == 5
    assert all(int(m.sum()) >= 1 for m in masks)


def _toy_energies(heads_hot: float):
    gen = torch.Generator().manual_seed(0)
    he = [torch.rand(4, generator=gen, dtype=torch.float64) * heads_hot for _ in range(3)]
    ne = [torch.rand(96, generator=gen, dtype=torch.float64) for _ in range(3)]
    return he, ne


@pytest.mark.parametrize("split", JOINT_SPLITS)
@pytest.mark.parametrize("c", [0.9, 0.6, 0.3, 0.15])
def test_split_budget_respects_budget(split, c):
    fm = FlopsModel(20.0, 32, (96,) * 3, heads=(4,) * 3, head_size=8)
    he, ne = _toy_energies(50.0)
    k_h, k_n = split_budget(fm, c, he, ne, split=split, min_heads=1)
    assert 3 <= k_h <= 12
    assert 0 <= k_n <= 288
    assert fm.total_from_count(k_n, k_h) <= c * fm.total() * (1 + 1e-9)
    # the neurons fill what the heads leave: one more neuron would not fit
    assert k_n == 288 or fm.total_from_count(k_n + 1, k_h) > c * fm.total()


def test_split_budget_follows_energy_per_mac():
    fm = FlopsModel(20.0, 32, (96,) * 3, heads=(4,) * 3, head_size=8)
    he_lo, ne = _toy_energies(1e-6)
    he_hi, _ = _toy_energies(1e6)
    lo = split_budget(fm, 0.6, he_lo, ne, split="per_mac")
    hi = split_budget(fm, 0.6, he_hi, ne, split="per_mac")
    assert lo[0] == 3  # worthless heads: only the minimum kept
    assert hi[0] == 12  # precious heads: all kept, the neurons pay
    assert hi[1] < lo[1]
    prop = split_budget(fm, 0.5, he_lo, ne, split="proportional")
    assert prop[0] == 6


def test_split_budget_bad_inputs():
    fm = FlopsModel(20.0, 32, (96,) * 3, heads=(4,) * 3, head_size=8)
    he, ne = _toy_energies(1.0)
    with pytest.raises(ValueError, match="split must be one of"):
        split_budget(fm, 0.5, he, ne, split="greedy")
    with pytest.raises(ValueError, match="joint floor"):
        split_budget(fm, 0.01, he, ne)
    with pytest.raises(ValueError, match="min_heads"):
        split_budget(fm, 0.5, he, ne, min_heads=0)
    with pytest.raises(ValueError, match="min_heads"):
        split_budget(fm, 0.5, he, ne, min_heads=5)
    with pytest.raises(ValueError, match="needs a FlopsModel with heads"):
        split_budget(FlopsModel(20.0, 32, (96,) * 3), 0.5, he, ne)
    with pytest.raises(ValueError, match="do not match"):
        split_budget(fm, 0.5, he[:2], ne)


def test_mean_square():
    e = [torch.tensor([[1.0, 2.0], [3.0, 4.0]])]
    assert torch.allclose(mean_square(e)[0], torch.tensor([5.0, 10.0], dtype=torch.float64))
