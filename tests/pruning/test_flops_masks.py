"""FLOPs budget, global top-k and min_keep."""

from __future__ import annotations

import math

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.flops import FlopsModel
from kcm_cuda.pruning.masks import global_topk, resolve_min_keep


@pytest.mark.parametrize("c", [0.5, 0.6, 0.7, 0.83, 1.0])
@pytest.mark.parametrize("s", [7.3, 40.0, 128.0])
def test_budget_within_one_neuron(c, s):
    fm = FlopsModel(s, 768, (3072,) * 12)
    k = fm.neuron_budget(c)
    budget = c * fm.total()
    assert fm.total_from_count(k) <= budget * (1 + 1e-12)
    assert k == sum(fm.sizes) or fm.total_from_count(k + 1) > budget


def test_bert_base_floor_matches_spec():
    # ALGORITHM.md: c < ~0.35 is below the attention floor for BERT-base at s ~ 128
    fm = FlopsModel(128.0, 768, (3072,) * 12)
    assert 0.3 < fm.attention_floor < 0.4
    with pytest.raises(ValueError, match=f"{fm.attention_floor:.4f}"):
        fm.neuron_budget(0.3)


@pytest.mark.parametrize("c", [0.55, 0.6, 0.75, 0.9])
def test_prune_kept_flops_le_budget_within_one_neuron(bert, tokenizer, sentences, c):
    r = prune(
        bert, sentences, c, method="magnitude", scale=False, tokenizer=tokenizer, progress=False
    )
    fl = r.report["flops"]
    assert fl["after"] <= fl["budget"] * (1 + 1e-12)
    assert fl["budget"] - fl["after"] < fl["per_neuron"]
    assert sum(r.report["kept_per_layer"]) == fl["neurons_kept"]
    assert sum(int(m.sum()) for m in r.masks.values()) == fl["neurons_kept"]
    # the physically pruned model has exactly the kept sizes
    sizes = [blk.intermediate.dense.out_features for blk in r.model.bert.encoder.layer]
    assert sizes == r.report["kept_per_layer"]
    assert r.model.config.kcm_intermediate_sizes == sizes


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.0001, 2, float("nan"), float("inf")])
def test_bad_flops_value(bert, tokenizer, sentences, bad):
    with pytest.raises(ValueError, match="flops"):
        prune(bert, sentences, bad, tokenizer=tokenizer, progress=False)


@pytest.mark.parametrize("bad", ["0.6", None, True])
def test_bad_flops_type(bert, tokenizer, sentences, bad):
    with pytest.raises(TypeError, match="flops"):
        prune(bert, sentences, bad, tokenizer=tokenizer, progress=False)


def test_below_attention_floor_says_the_floor(bert, tokenizer, sentences):
    with pytest.raises(ValueError, match=r"attention floor 0\.\d{4}") as info:
        kw = dict(method="random", heads=False, tokenizer=tokenizer, progress=False)
        prune(bert, sentences, 0.2, **kw)
    floor = float(str(info.value).split("attention floor ")[1].split(":")[0])
    # just above the floor works
    r = prune(
        bert,
        sentences,
        math.ceil(floor * 1000) / 1000 + 0.01,
        method="random",
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        min_keep=0,
    )
    assert r.report["flops"]["ratio"] >= floor


def test_global_topk_is_global():
    torch.manual_seed(0)
    scores = [torch.rand(50, dtype=torch.float64) for _ in range(3)]
    base = global_topk(scores, 60)
    boosted = [scores[0], scores[1] + 1.0, scores[2]]
    masks = global_topk(boosted, 60)
    assert int(masks[1].sum()) > int(base[1].sum())
    assert int(masks[1].sum()) == 50  # all of layer 1 beats every other neuron
    assert sum(int(m.sum()) for m in masks) == 60


def test_global_topk_min_keep_and_ties():
    scores = [torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)]
    masks = global_topk(scores, 12, [3, 0])
    assert [int(m.sum()) for m in masks] == [3, 9]
    # ties resolved by (layer, index): deterministic, first indices
    assert masks[0][:3].all() and not masks[0][3:].any()
    with pytest.raises(ValueError):
        global_topk(scores, 2, [3, 0])


def test_magnitude_boost_moves_allocation(bert, tokenizer, sentences):
    base = prune(
        bert, sentences, 0.7, method="magnitude", scale=False, tokenizer=tokenizer, progress=False
    )
    with torch.no_grad():
        bert.bert.encoder.layer[1].output.dense.weight.mul_(5.0)
    boosted = prune(
        bert, sentences, 0.7, method="magnitude", scale=False, tokenizer=tokenizer, progress=False
    )
    kb, kk = base.report["kept_per_layer"], boosted.report["kept_per_layer"]
    assert kk[1] > kb[1]
    assert sum(kk) == sum(kb)


def test_resolve_min_keep():
    assert resolve_min_keep(0.01, [3072, 100]) == [31, 1]
    assert resolve_min_keep(5, [3, 10]) == [3, 5]
    with pytest.raises(ValueError, match="min_keep"):
        resolve_min_keep(1.5, [10])
    with pytest.raises(ValueError, match="min_keep"):
        resolve_min_keep(-1, [10])
